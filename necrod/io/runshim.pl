# runshim.py's supervising mode, in Perl: the same arguments, the same exit record. Perl starts
# in 2 ms of CPU where Python, even with -I -S, takes 12-17 ms, and this runs once per task
# (issue 22). launchers.py uses it where perl is installed (every Debian: perl-base is essential).
#
#   perl runshim.pl --exit-file PATH [--cgroup DIR]... -- COMMAND...
#
# The launcher starts it with no PERL* variables (they would change how perl itself starts:
# PERL5OPT can load modules): the runner's come as NECROD_RUNSHIM_PERL*, renamed back for the
# command only (kept out of the command line, which any user can read). It loads no module:
# every use costs start-up time.
use strict;

my ($exit_file, @cgroups);
while (@ARGV && $ARGV[0] ne '--') {
    my ($option, $value) = splice(@ARGV, 0, 2);
    if ($option eq '--exit-file') { $exit_file = $value }
    elsif ($option eq '--cgroup') { push @cgroups, $value }
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

$SIG{$_} = 'IGNORE' for qw(TERM INT HUP);
# Above $^F (2), perl opens descriptors close-on-exec: EOF at the exec, or why it failed.
pipe(my $failed_r, my $failed_w) or die "runshim: pipe: $!\n";
my $pid = fork();
die "runshim: fork: $!\n" unless defined $pid;
if ($pid == 0) {
    close $failed_r;
    $SIG{$_} = 'DEFAULT' for qw(TERM INT HUP);
    for my $name (grep { /\ANECROD_RUNSHIM_PERL/ } keys %ENV) {
        $ENV{substr($name, length 'NECROD_RUNSHIM_')} = delete $ENV{$name};
    }
    my $why;
    for my $cgroup (@cgroups) {
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
waitpid($pid, 0);
my $status = $?;
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
