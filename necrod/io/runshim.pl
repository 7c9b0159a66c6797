# runshim.py's supervising mode, in Perl: the same arguments, the same exit record. Perl starts
# in 2 ms of CPU where Python, even with -I -S, takes 12-17 ms, and this runs once per task
# (issue 22). launchers.py uses it where perl is installed (every Debian: perl-base is essential).
#
#   perl runshim.pl --exit-file PATH [--cgroup DIR]... [--log-limit BYTES] -- COMMAND...
#
# The launcher starts it with no PERL* variables (they would change how perl itself starts:
# PERL5OPT can load modules): the runner's come as NECROD_RUNSHIM_PERL*, renamed back for the
# command only (kept out of the command line, which any user can read). It loads no module:
# every use costs start-up time.
use strict;

my ($exit_file, @cgroups, $log_limit);
while (@ARGV && $ARGV[0] ne '--') {
    my ($option, $value) = splice(@ARGV, 0, 2);
    if ($option eq '--exit-file') { $exit_file = $value }
    elsif ($option eq '--cgroup') { push @cgroups, $value }
    elsif ($option eq '--log-limit' && $value =~ /\A\d+\z/) { $log_limit = $value }
    else { print STDERR "runshim: unknown option '$option'\n"; exit 127 }
}
shift @ARGV;
my @command = @ARGV;
if (!@command || !defined $exit_file) { print STDERR "runshim: no command or no exit file\n"; exit 127 }

sub json_string {
    my ($text) = @_;
    $text =~ s/(["\\])/\\$1/g;
    $text =~ s/([^\x20-\x7e])/sprintf('\\u%04x', ord $1)/ge;
    return "\"$text\"";
}

# Copies the command's output to the log until the command has ended and nothing more is ready
# (a background child that keeps the pipe open does not hold the record back), keeping at most
# $log_limit bytes in the log, what it held already counted, then one line saying so. What is
# past the limit is read and dropped: the command is neither blocked nor stopped by it.
# Returns the command's wait status.
sub copy_output {
    my ($from, $pid) = @_;
    my $left = $log_limit - (-s STDOUT || 0);
    my ($data, $status, $got, $after) = ('', undef, 0, 0);
    local $SIG{CHLD} = sub {};  # ends a wait in select() when the command ends
    while (1) {
        if (!defined $status && waitpid($pid, 1) == $pid) { $status = $? }  # 1: WNOHANG
        my $ready = '';
        vec($ready, fileno($from), 1) = 1;
        if (select($ready, undef, undef, defined $status ? 0 : 0.25) <= 0) {  # none, or a signal
            last if defined $status;
            next;
        }
        last unless $got = sysread($from, $data, 65536);  # end of file: no writer is left
        # Once the command has ended, what it wrote is at most a pipe's buffer: the rest is a
        # background child's, which may never stop.
        last if defined $status && ($after += $got) > 1 << 20;
        if ($left > 0) {
            syswrite(STDOUT, $data, $got < $left ? $got : $left);
            $left -= $got;
            syswrite(STDOUT, "\n[necrod: this log was cut at $log_limit bytes; the runner's output after it was not kept]\n")
                if $left <= 0;
        }
    }
    close $from;
    unless (defined $status) { waitpid($pid, 0); $status = $? }
    return $status;
}

$SIG{$_} = 'IGNORE' for qw(TERM INT HUP);
# Above $^F (2), perl opens descriptors close-on-exec: EOF at the exec, or why it failed.
pipe(my $failed_r, my $failed_w) or die "runshim: pipe: $!\n";
# With --log-limit the command writes into a pipe and this copies what fits to the log (its
# own stdout): an agent's output must not fill the state directory's disk.
my ($output_r, $output_w);
if (defined $log_limit) { pipe($output_r, $output_w) or die "runshim: pipe: $!\n" }
my $pid = fork();
die "runshim: fork: $!\n" unless defined $pid;
if ($pid == 0) {
    close $failed_r;
    my $why;
    if (defined $output_w) {  # descriptors dup'ed onto 1 and 2: no path is opened
        close $output_r;
        $why = "cannot hand its output to the wrapper: $!"
            unless open(STDOUT, '>&', $output_w) && open(STDERR, '>&', $output_w);
        close $output_w;
    }
    $SIG{$_} = 'DEFAULT' for qw(TERM INT HUP);
    for my $name (grep { /\ANECROD_RUNSHIM_PERL/ } keys %ENV) {
        $ENV{substr($name, length 'NECROD_RUNSHIM_')} = delete $ENV{$name};
    }
    for my $cgroup (defined $why ? () : @cgroups) {
        my $procs;
        unless (open($procs, '>>', "$cgroup/cgroup.procs") && print($procs "$$") && close($procs)) {
            $why = "cannot join the cgroup $cgroup: $!";
            last;
        }
    }
    unless (defined $why) {
        exec { $command[0] } @command;
        $why = "cannot run '$command[0]': $!";
    }
    syswrite($failed_w, $why);
    exit 127;
}
close $failed_w;
my $failed = '';
1 while sysread($failed_r, $failed, 4096, length $failed);
close $failed_r;
my $status;
if (defined $output_r) {
    close $output_w;
    $status = copy_output($output_r, $pid);
} else {
    waitpid($pid, 0);
    $status = $?;
}
my ($signal, $code) = ($status & 127, $status >> 8);
my (undef, undef, $child_user, $child_system) = times;
my @record = (
    '"code": ' . ($signal ? 'null' : $code),
    '"signal": ' . ($signal ? $signal : 'null'),
    sprintf('"cpu_s": %.6f', $child_user + $child_system),
    '"peak_rss_bytes": null',
);
if (length $failed) {
    push @record, '"start_failed": ' . json_string($failed);
    print STDERR "runshim: $failed\n";
}
open(my $out, '>', "$exit_file.tmp") or exit 127;
print $out '{' . join(', ', @record) . '}';
close $out or exit 127;
rename("$exit_file.tmp", $exit_file) or exit 127;
exit($signal ? 128 + $signal : $code);
