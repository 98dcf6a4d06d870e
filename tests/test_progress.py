"""Progress reaches logs: a bar on a terminal, plain lines every 10% anywhere else."""

import io
import re

from tqdm import tqdm

from forcelab import cli
from forcelab.progress import LINE_EVERY_PERCENT, LineProgress, progress_bar


class Terminal(io.StringIO):
    def isatty(self):
        return True


def lines(stream):
    return [line for line in stream.getvalue().splitlines() if line]


def test_a_terminal_gets_a_bar_and_anything_else_plain_lines():
    assert isinstance(progress_bar(total=3, desc="x", unit="step", file=Terminal()), tqdm)
    assert isinstance(progress_bar(total=3, desc="x", unit="step", file=io.StringIO()), LineProgress)


def test_a_line_each_tenth_and_one_at_the_end():
    out = io.StringIO()
    bar = progress_bar(total=95, desc="generate", unit="frame", file=out)
    for _ in range(95):
        bar.update(1)
    bar.close()
    bar.close()                                              # closing twice prints nothing more
    got = lines(out)
    assert len(got) == 100 // LINE_EVERY_PERCENT             # 10%..90% while running, then the end
    counts = [int(re.match(r"generate: (\d+)/95 frame \((\d+)%\)", line).group(1)) for line in got]
    assert counts == [10, 19, 29, 38, 48, 57, 67, 76, 86, 95]   # the first count at or past each tenth
    assert got[-1].startswith("generate: 95/95 frame (100%)") and "frame/s" in got[-1]


def test_iterating_resuming_postfix_and_disable():
    out = io.StringIO()
    assert list(progress_bar(range(4), desc="toybench", unit="video", file=out)) == [0, 1, 2, 3]
    assert lines(out)[-1].startswith("toybench: 4/4 video (100%)")
    out = io.StringIO()
    bar = progress_bar(total=10, initial=5, desc="train", unit="step", file=out)   # a resumed run
    bar.set_postfix({"loss": "0.5"})
    bar.update(5)
    bar.close()
    assert lines(out) == [lines(out)[0]] and re.match(r"train: 10/10 step \(100%\) .* loss=0.5$", lines(out)[0])
    out = io.StringIO()
    bar = progress_bar(total=10, desc="quiet", unit="step", disable=True, file=out)
    bar.update(10)
    bar.close()
    bar.write("a console line still prints")
    assert lines(out) == ["a console line still prints"]
    out = io.StringIO()
    with progress_bar(total=None, desc="open", unit="item", file=out) as bar:   # no total: only the end
        bar.update(3)
    assert lines(out)[0].startswith("open: 3 item ")


def test_preprocess_into_a_log_prints_progress_lines(tmp_path, capsys):
    (tmp_path / "p.txt").write_text("".join(f"a red ball number {i}\n" for i in range(3)))
    rc = cli.main(["preprocess", "--prompts", str(tmp_path / "p.txt"), "--out", str(tmp_path / "out"),
                   "--text-encoder", "toy", "--shard-size", "1"])
    assert rc == 0
    err = capsys.readouterr().err                            # pytest's capture is not a terminal
    assert "preprocess (rank 0/1): 3/3 input (100%)" in err and "\r" not in err
