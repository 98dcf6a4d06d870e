"""Evaluation: ToyBench (toybench.py), VBench (vbench.py, vbench_runner.py, vbench_long.py,
vbench_prompts.py) and reports (report.py); the `forcelab eval` command is eval/cli.py."""
