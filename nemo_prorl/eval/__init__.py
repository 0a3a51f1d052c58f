"""`prorl eval`: pass@k of checkpoints on benchmark files (runner.py: the command, loading checkpoints and
benchmarks) and its report (report.py: the table and the curves). The evaluation itself, which the trainer's
validation runs too, is trainer/evaluation.py."""
