"""One command that measures forcelab on one GPU within a time budget, and writes it all down.

    python -m forcelab.bench.gpu_check --out gpu_check_out            # on a GPU: about 8 minutes
    python -m forcelab.bench.gpu_check --out smoke_out --smoke        # tiny shapes, CPU or GPU, < 1 min
    make gpu-check                                                    # the first, on a bare GPU machine

Parts (parts.py), in this order, each in its own process with its own time budget (runner.py):
    tests       `pytest -m gpu` over the test files that hold gpu-marked tests: pass/fail counts
    attention   forcelab's Triton block-sparse kernels, SDPA, FlexAttention and flash-attn at the
                Wan-1.3B shape (block-causal training layout, cached streaming layouts), bf16,
                forward and backward, TFLOP/s and % of the card's peak, error vs float32 SDPA
    streaming   frames/s of chunk-wise streaming at 480x832 with random Wan-1.3B weights, the
                DiT alone and with the Wan VAE's streaming decode (needs diffusers)
    training    one Self-Forcing step of configs/recipes/self_forcing.yaml on random Wan-1.3B
                weights: seconds, peak memory, model FLOPs and MFU
A part that fails is recorded with its one-line error and the next part runs; a part that
runs past its budget is stopped and keeps what it had recorded; a part that cannot start
before the overall budget ends is skipped, saying so. The report (report.py) is
gpu_check.json and gpu_check.md in --out: the card, driver, CUDA, torch and triton versions,
the date, every number and every skip with its reason. --smoke numbers are labelled as such.

Nothing here imports an optional package (omegaconf, diffusers, webdataset, av) at module
level: a machine without one still runs every part that does not need it.
"""
