"""Evaluation: ToyBench (toybench.py; known defects to check metrics against in degradations.py), VBench (vbench.py, vbench_runner.py, vbench_long.py; the
prompt suite is generate/vbench_suite.py) and reports (report.py); the `forcelab eval` command is
eval/cli.py."""
