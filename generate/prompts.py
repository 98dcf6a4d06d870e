"""The prompts of `forcelab generate`: --prompt / --prompts / --extended-prompts, or the bundled
VBench suite (--vbench-prompts, vbench_suite.py).

    names, texts = read_prompts(args)   # names go into file names, texts condition the model
"""

from __future__ import annotations

from ..errors import ForcelabError
from ..fsio import read_text
from .vbench_suite import parse_dimension_list, select_prompts


def read_prompts(args) -> tuple[list[str], list[str]]:
    """-> (names, texts): names go into file names, texts condition the model. With the VBench
    suite, sets args.vbench (VBench's file names) and args.vbench_suite (what was chosen)."""
    if getattr(args, "vbench_prompts", None):
        if args.prompt or args.prompts or args.extended_prompts:
            raise ForcelabError("--vbench-prompts replaces --prompt/--prompts/--extended-prompts: give one or the other")
        names, texts, args.vbench_suite = select_prompts(parse_dimension_list(args.vbench_prompts),
                                                         extended=args.vbench_extended)
        args.vbench = True
        return names, texts
    if getattr(args, "vbench_extended", False):
        raise ForcelabError("--vbench-extended goes with --vbench-prompts")
    names = list(args.prompt)
    if args.prompts:
        names += read_prompt_lines(args.prompts, "--prompts")
    if not names:
        raise ForcelabError("no prompt: give --prompt TEXT or --prompts FILE")
    texts = names
    if args.extended_prompts:
        if not args.prompts or args.prompt:
            raise ForcelabError("--extended-prompts goes with --prompts (and no --prompt): the lines pair up")
        texts = read_prompt_lines(args.extended_prompts, "--extended-prompts")
        if len(texts) != len(names):
            raise ForcelabError(f"--extended-prompts has {len(texts)} prompts, --prompts {len(names)}; "
                                f"they must be line-aligned")
    return names, texts


def read_prompt_lines(path, what: str = "prompts") -> list[str]:
    """A UTF-8 prompt file: one prompt per line, blank lines skipped."""
    return [line.strip() for line in read_text(path, what).splitlines() if line.strip()]
