"""Evaluation: ToyBench (toybench.py), VBench (vbench.py, vbench_runner.py, vbench_long.py; the
prompt suite is generate/vbench_suite.py) and reports (report.py); the `forcelab eval` command is
eval/cli.py."""
