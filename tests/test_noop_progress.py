"""Issue 25, items 4 and 5: no silent no-op (check-config and the run's start say when a study will train
nothing because a weight is missing, naming the key to set) and progress (rate-limited log lines with the
epoch's and the whole run's time left; learning curves titled with cohort / setting / fold, integer epoch
ticks)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from morphomol.cli import main
from morphomol.config import load_config
from morphomol.studies import NOOP_LOGGER

REPO = Path(__file__).resolve().parents[1]


def spots_config(tmp_path: Path, **spots) -> Path:
    """A config with one visium cohort: the demo's (simulated) Space Ranger sheet and settings, with the
    given ``spots`` overrides."""
    cohort = yaml.safe_load((REPO / "config" / "cohorts" / "demo_spots.yaml").read_text())
    cohort["samples"] = str(REPO / cohort["samples"])
    cohort["spots"].update(spots)
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({"cohorts": {"sr": str(tmp_path / "cohort.yaml")}}))
    return cfg


# ------------------------------------------------------------------------------ 4. no silent no-op
def test_check_config_says_no_spots_head_is_trained_without_uni2h_weights(tmp_path, monkeypatch, capsys):
    """The default spots.encoder (uni2h) without weights: every setting is skipped. check-config still passes
    (the baselines run) but says that no head will be trained and which key to set."""
    cfg = spots_config(tmp_path, encoder="uni2h")
    monkeypatch.chdir(REPO)
    root = logging.getLogger("morphomol")
    saved = (list(root.handlers), root.propagate, root.level)
    try:
        assert main(["check-config", "--config", str(cfg)]) in (0, None)
    finally:  # the CLI's logging set-up writes to this test's captured stderr: undone for the next tests
        root.handlers[:], root.propagate, root.level = saved
    out = capsys.readouterr().out
    assert "spots: 0/10 settings runnable (10 need encoders.uni2h.weights)" in out, out
    warning = [ln for ln in out.splitlines() if ln.startswith("WARNING:")]
    assert len(warning) == 1, out
    assert "will train no head" in warning[0] and "set encoders.uni2h.weights" in warning[0], warning
    assert "only the baselines run (mean, depth_only)" in warning[0], warning  # ridge needs the uni2h features
    assert "configuration OK (with 1 warning" in out, out
    assert out.count("will train no head") == 1  # printed once (the check's log line is silenced here)


def test_real_space_ranger_cohort_with_the_default_encoder(tmp_path, monkeypatch, capsys):
    """The issue's case: Space Ranger outs (the real scanpy Visium mini sample, twice), no spots section (the
    default uni2h), no weights: check-config names the key; with vit_s and no weights it says the heads train
    on a randomly initialised encoder's features."""
    from test_spots_config import make_config

    cfg = make_config(tmp_path)
    cohort = yaml.safe_load((tmp_path / "cohort.yaml").read_text())
    del cohort["spots"]
    (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort))
    monkeypatch.chdir(tmp_path)
    root = logging.getLogger("morphomol")
    saved = (list(root.handlers), root.propagate, root.level)
    try:
        assert main(["check-config", "--config", "config.yaml"]) in (0, None)
        out = capsys.readouterr().out
        assert "cohort mini (visium; studies spots)" in out and "spots: 0/10 settings runnable" in out, out
        assert "WARNING: cohort 'mini': the spots study will train no head" in out
        assert "set encoders.uni2h.weights" in out
        cohort["spots"] = {"encoder": "vit_s"}
        (tmp_path / "cohort.yaml").write_text(yaml.safe_dump(cohort))
        assert main(["check-config", "--config", str(cfg)]) in (0, None)
        out = capsys.readouterr().out
        assert "spots: 7/10 settings runnable (3 need captions" in out and "will train no head" not in out, out
        assert "randomly initialised vit_s" in out and "encoders.vit_s.weights" in out
    finally:
        root.handlers[:], root.propagate, root.level = saved


def test_the_run_logs_the_no_op_warning_and_a_runnable_cohort_none(tmp_path, caplog):
    """The same check in the Snakemake process (load_config with the pre-flight): a WARNING naming the key;
    a cluster job's re-parse (no pre-flight) stays quiet; the demo's vit_s cohort has no warning."""
    cfg = spots_config(tmp_path, encoder="uni2h")
    with caplog.at_level(logging.WARNING, logger=NOOP_LOGGER):
        load_config(cfg, workdir=REPO)
    msgs = [r.getMessage() for r in caplog.records if r.name == NOOP_LOGGER]
    assert len(msgs) == 1 and "cohort 'sr'" in msgs[0] and "encoders.uni2h.weights" in msgs[0], msgs
    assert caplog.records[-1].levelno == logging.WARNING
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=NOOP_LOGGER):
        load_config(cfg, workdir=REPO, preflight=False)
        load_config(spots_config(tmp_path), workdir=REPO)  # the demo's vit_s: every setting runs
    assert not [r for r in caplog.records if r.name == NOOP_LOGGER]


def test_reference_setting_without_captions_is_named(tmp_path):
    """Captions off: the alignment settings (and a reference among them) cannot run; the summary says so."""
    from morphomol.studies import get_study

    cfg = spots_config(tmp_path, captions={"source": "none"}, reference="align_captions")
    pc = load_config(cfg, workdir=REPO)
    s = get_study("spots").summary(pc.cohorts["sr"], workdir=REPO)
    assert s.line.startswith("spots: 7/10 settings runnable (3 need captions (spots.captions.source))"), s.line
    assert len(s.warnings) == 1 and "reference setting 'align_captions' cannot run" in s.warnings[0]


# ------------------------------------------------------------------------------ 5. progress
class Lin:  # built lazily: torch is imported inside the tests only
    @staticmethod
    def make():
        import torch

        class _Lin(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.l = torch.nn.Linear(3, 1)

            def forward(self, b):
                return self.l(b["x"].float())

            def param_groups(self, lr_head, lr_backbone):
                return [{"params": list(self.parameters()), "lr": lr_head}]

        return _Lin()


def tiny_fit(work_dir: Path, epochs: int = 3):
    """A real fit of a linear model on 64 rows in batches of 16 (4 batches per epoch)."""
    import torch

    from morphomol.config import TrainingConfig, default_sections
    from morphomol.train.loop import fit
    from morphomol.train.runtime import Runtime
    from morphomol.train.sources import InMemoryTiles

    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32))[:, None]
    src = InMemoryTiles([f"t{i}" for i in range(64)], x=x, target=y)
    t = default_sections().training
    training = TrainingConfig(**{**t.__dict__, "epochs": epochs, "warmup_epochs": 1, "batch_size": 16,
                                 "num_workers": 0, "lr_head": 0.05})
    val = lambda m: (float(((m({"x": torch.from_numpy(x)}).detach().numpy() - y) ** 2).mean()), {})  # noqa: E731
    return fit(Lin.make(), src, ["x", "target"], training, Runtime(seed=0, device="cpu"), work_dir,
               loss_fn=lambda m, b: ((m(b) - b["target"].float()) ** 2).mean(), validate=val, fingerprint={"k": "v"})


def test_training_log_lines_carry_the_epoch_and_run_eta(tmp_path, monkeypatch, caplog):
    """Log mode (SLURM, rule logs): within-epoch lines with the time left in the epoch and in the whole run
    (here one per batch: MORPHOMOL_PROGRESS_SECONDS=0), and every epoch line but the last with the run's."""
    import re

    monkeypatch.setenv("MORPHOMOL_PROGRESS", "log")
    monkeypatch.setenv("MORPHOMOL_PROGRESS_SECONDS", "0")
    with caplog.at_level(logging.INFO, logger="morphomol"):
        tiny_fit(tmp_path / "results" / "c" / "spots" / "runs" / "s" / "fold0" / "seed1")
    msgs = [r.getMessage() for r in caplog.records]
    within = [m for m in msgs if re.match(r"epoch \d/3: \d/4 batch", m) and "(done in" not in m]
    assert len(within) == 12, msgs  # 3 epochs x 4 batches
    eta = re.compile(r"epoch \d/3: (\d)/4 batch \(\d+%, [\d.e+]+ batch/s, epoch \d+:\d\d left, run \d+:\d\d left\)")
    for m in within[:-1]:
        assert eta.fullmatch(m), m
    assert within[-1].startswith("epoch 3/3: 4/4 batch") and "run" not in within[-1]  # nothing left to run
    epochs = [m for m in msgs if re.match(r"epoch \d/3 loss", m)]
    assert len(epochs) == 3
    assert all(re.search(r"\| run \d+:\d\d left$", m) for m in epochs[:2]) and "left" not in epochs[2], epochs


def test_training_bar_shows_the_epoch_and_run_eta(tmp_path, monkeypatch, capsys):
    """Bar mode (a terminal): a tqdm bar within each epoch, its postfix the run's time left."""
    monkeypatch.setenv("MORPHOMOL_PROGRESS", "bar")
    tiny_fit(tmp_path / "run")
    err = capsys.readouterr().err
    for e in (1, 2, 3):
        assert f"epoch {e}/3:" in err and "batch" in err, err
    assert "run ?:?? left" in err  # the first bar, before a pace is known
    assert "/4 [" in err  # tqdm's n/total of the epoch's batches


def test_learning_curve_has_a_title_and_whole_epoch_ticks(tmp_path):
    from morphomol.train.history import LEARNING_CURVE, learning_curve_figure, run_title

    run = tmp_path / "results" / "demo_spots" / "spots" / "runs" / "seed_head" / "fold1" / "seed40"
    tiny_fit(run, epochs=3)
    assert (run / LEARNING_CURVE).is_file()
    title = run_title(run)
    assert title == "demo_spots · spots · seed_head · fold 1 · seed 40"
    assert run_title(tmp_path / "results" / "demo" / "fusion" / "runs" / "early" / "fold0") == \
        "demo · fusion · early · fold 0"
    df = pd.read_csv(run / "history.csv")
    fig = learning_curve_figure(df, best_epoch=2, title=title)
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    assert ax.get_title().splitlines() == [title, "best epoch 2"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_a_terminal_gets_the_bar_by_default_also_inside_a_slurm_allocation(tmp_path, monkeypatch):
    """stderr on a real pseudo-terminal, no MORPHOMOL_PROGRESS, inside an allocation (``salloc``: SLURM_JOB_ID
    set): the epochs' bars are drawn on the terminal."""
    import fcntl
    import os
    import struct
    import sys
    import termios
    import threading

    from morphomol.util import progress

    monkeypatch.delenv("MORPHOMOL_PROGRESS", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a 100-column terminal
    chunks: list[bytes] = []

    def drain() -> None:  # the terminal's other end, read while the fit writes (a full pty would block it)
        while not b"".join(chunks[-2:]).endswith(b"END-OF-TEST\r\n"):
            try:
                b = os.read(master, 4096)
            except OSError:  # EIO: the terminal was closed
                return
            if not b:
                return
            chunks.append(b)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    tty = os.fdopen(slave, "w", buffering=1)
    try:
        monkeypatch.setattr(sys, "stderr", tty)
        assert progress.interactive() and progress.mode() == "bar"
        tiny_fit(tmp_path / "run", epochs=2)
        tty.write("END-OF-TEST\n")
        tty.flush()
        reader.join(timeout=60)
    finally:
        monkeypatch.setattr(sys, "stderr", sys.__stderr__)
        tty.close()
        reader.join(timeout=10)
        os.close(master)
    text = b"".join(chunks).decode(errors="replace")
    assert "epoch 1/2:" in text and "epoch 2/2:" in text and "0/4 [" in text, text


def test_run_eta_counts_every_batch_left_at_this_process_pace():
    """A clock stepping 1 s per batch: after the first of 2 epochs of 4 batches, 4 s left; time spent between
    epochs (validation) slows the pace; a finished run has no estimate; a run of 3 epochs resumed after its
    first counts, after its second, the 4 batches left at its own pace (2 s per batch: 8 s)."""
    from morphomol.util.progress import TrainProgress

    now = [0.0]

    def train(prog: TrainProgress, epoch: int, seconds: float) -> None:
        for _ in prog.batches(range(4), epoch=epoch, total=4, report=False):
            now[0] += seconds

    prog = TrainProgress(epochs=2, steps_per_epoch=4, clock=lambda: now[0])
    assert prog.run_eta() == "run ?:?? left"
    train(prog, 0, 1.0)
    assert prog.run_left() == pytest.approx(4.0) and prog.run_eta() == "run 0:04 left"
    now[0] += 4.0  # validation
    assert prog.run_left() == pytest.approx(8.0)
    train(prog, 1, 1.0)
    assert prog.run_eta() == ""
    resumed = TrainProgress(epochs=3, steps_per_epoch=4, done=4, clock=lambda: now[0])
    train(resumed, 1, 2.0)
    assert resumed.run_left() == pytest.approx(8.0) and resumed.run_eta() == "run 0:08 left"
