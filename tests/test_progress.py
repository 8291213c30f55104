"""progress.py: MFU never above 100% against a measured peak, logs that start at their first record, and the
samples as the terminal shows them."""

import json
import types

from progress import EvalResult, JsonLog, Progress, Rate


def test_a_measured_peak_is_raised_by_a_step_that_beats_it_and_a_datasheet_peak_is_not():
    measured = Rate(tokens_per_step=1000, flops_per_token=1e6, peak=1e9, measured=True)
    assert measured.mfu(500) == 0.5
    assert measured.mfu(2000) == 1.0 and measured.peak == 2e9  # 2 GFLOP/s done: the CPU can do at least that
    assert measured.mfu(1000) == 0.5
    datasheet = Rate(tokens_per_step=1000, flops_per_token=1e6, peak=1e9)
    assert datasheet.mfu(2000) == 2.0  # a GPU's datasheet peak stays: above 100% there is a FLOP-count bug to see


def test_a_fresh_log_appears_with_its_first_record_and_replaces_an_earlier_one_then(tmp_path):
    path = tmp_path / "metrics.jsonl"
    JsonLog(str(path), start_iter=0, master=True)
    assert not path.exists()  # a run stopped before its first record leaves no empty file
    path.write_text('{"iter": 7}\n')
    log = JsonLog(str(path), start_iter=0, master=True)
    assert path.read_text() == '{"iter": 7}\n'  # untouched until this run has something to say
    log.write({"iter": 1})
    log.write({"iter": 2})
    assert [json.loads(line)["iter"] for line in path.read_text().splitlines()] == [1, 2]
    JsonLog(str(path), start_iter=1, master=True).write({"iter": 2})  # a resumed run keeps the records up to it
    assert [json.loads(line)["iter"] for line in path.read_text().splitlines()] == [1, 2]


def test_samples_on_the_terminal_keep_the_space_after_the_prompt(tmp_path, capsys):
    cfg = types.SimpleNamespace(log_interval=1, max_iters=1, out_dir=str(tmp_path), wandb_log=False)
    state = types.SimpleNamespace(start_iter=0, iter_num=0, tokens_seen=0)
    progress = Progress(cfg, state, True, Rate(1, 1.0, None))
    progress.evaluation(state, EvalResult(1.0, None, [], [("The meaning of life is", " something\n\nnew"),
                                                          ("Once", "upon")]))
    progress.close()
    said = capsys.readouterr().out
    assert "  > The meaning of life is something new\n" in said and "  > Onceupon\n" in said
    assert json.loads((tmp_path / "samples.jsonl").read_text().splitlines()[0])["text"] == " something\n\nnew"
