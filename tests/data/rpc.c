/* One JSON-RPC call over a Unix socket, for runners in containers with no client of their own
 * (the test image is busybox, which cannot speak to a Unix socket). Built static by the tests.
 * usage: rpc SOCKET JSON-LINE   -> prints the reply line; exit 1 when it cannot connect. */
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 3) { fprintf(stderr, "usage: rpc SOCKET JSON\n"); return 2; }
    int fd = socket(AF_UNIX, SOCK_STREAM, 0);
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    strncpy(addr.sun_path, argv[1], sizeof addr.sun_path - 1);
    if (fd < 0 || connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("connect"); return 1; }
    if (write(fd, argv[2], strlen(argv[2])) < 0 || write(fd, "\n", 1) < 0) { perror("write"); return 1; }
    char c;
    while (read(fd, &c, 1) == 1) { putchar(c); if (c == '\n') break; }
    close(fd);
    return 0;
}
