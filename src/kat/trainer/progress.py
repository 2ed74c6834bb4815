"""How far along a run is: steps done of ``trainer.max_steps``, rate, ETA and a metric or two.

* :class:`Progress`, the Lightning callback of every stage (``callbacks.progress``): a rich bar when stdout is a
  terminal; otherwise (a pipe, a CI log, ``python -m kat.pipeline``'s children) one plain log line every
  ``every_n_seconds``, at the first and the last step, and around each validation::

      step 120/1000 (12 %) · 3.1 steps/s · ETA 4m43s · train/loss 1.234

  Lightning's own bars count the batches of the current epoch (kat's runs are bounded by ``max_steps`` over a
  repeating data set), so they give the epoch's ETA, not the run's. The rate leaves validation out; the ETA
  is for the remaining training steps (validations and the export come on top).
* :class:`PipelineProgress`, what ``python -m kat.pipeline`` shows: the recipe step (k of n), the child's
  progress (a bar in a terminal, its lines otherwise), elapsed time and, when there is a reference to scale,
  the ETA of the whole pipeline (:func:`reference_seconds`).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import re
import sys
import time
from pathlib import Path

import lightning as L

from kat.utils import get_logger

log = get_logger(__name__)

STYLES = ("auto", "bar", "lines", "none")


def fmt_duration(seconds: float) -> str:
    """``42s``, ``4m43s``, ``1h02m``."""
    s = max(0, int(round(seconds)))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def parse_duration(text: str) -> float | None:
    """The inverse of :func:`fmt_duration` (None when ``text`` is not one)."""
    m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text)
    if not m or not any(m.groups()):
        return None
    h, mi, s = (int(g or 0) for g in m.groups())
    return 3600 * h + 60 * mi + s


def fmt_rate(steps_per_s: float) -> str:
    """``3.1 steps/s``, or ``4.8 s/step`` below one step a second."""
    if steps_per_s >= 1:
        return f"{steps_per_s:.1f} steps/s"
    return f"{1 / max(steps_per_s, 1e-9):.1f} s/step"


#: a progress line (the message part of the log line)
LINE = re.compile(r"step (?P<step>\d+)(?:/(?P<total>\d+))?(?: \(\d+ %\))?(?P<rest>(?: · .*)?)$")


def parse_line(line: str) -> dict | None:
    """``{"step", "total", "eta_s", "text"}`` of a :class:`Progress` log line (None for any other line)."""
    if "[kat.trainer.progress]" not in line:
        return None
    text = line.rstrip().split(" - ", 1)[-1]
    m = LINE.match(text)
    if not m:
        return None
    eta = re.search(r" · ETA (\S+)", m["rest"])
    return {"step": int(m["step"]), "total": int(m["total"]) if m["total"] else None,
            "eta_s": parse_duration(eta[1]) if eta else None, "text": text}


def use_bar(style: str) -> bool:
    if style not in STYLES:
        raise ValueError(f"progress style must be one of {STYLES}, got {style!r}")
    return style == "bar" or (style == "auto" and sys.stdout.isatty())


@contextlib.contextmanager
def live_bar(*columns):
    """A rich progress display on stdout; log lines (handlers writing to the terminal) are printed above it."""
    from rich.console import Console
    from rich.progress import Progress as RichProgress

    bar = RichProgress(*columns, console=Console(file=sys.stdout), refresh_per_second=2)
    bar.start()  # sys.stdout / sys.stderr now print through the display
    moved = []
    for lg in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for h in getattr(lg, "handlers", []):
            stream = getattr(h, "stream", None)
            if type(h) is logging.StreamHandler and stream in (sys.__stdout__, sys.__stderr__):
                moved.append((h, stream))
                h.setStream(sys.stdout if stream is sys.__stdout__ else sys.stderr)
    try:
        yield bar
    finally:
        for h, old in moved:
            h.setStream(old)
        bar.stop()


class Progress(L.Callback):
    """Steps done of the run's total, rate, ETA and ``metrics`` (rank 0): a bar or plain lines (module docstring).

    ``style``: auto (a bar when stdout is a terminal, else lines) | bar | lines | none. ``every_n_seconds``: the
    period of the plain lines (0 = every step). ``metrics``: shown when the stage logs them.
    """

    def __init__(self, style: str = "auto", every_n_seconds: float = 10.0,
                 metrics: tuple[str, ...] | list[str] = ("train/loss", "rl/reward_mean")):
        use_bar(style)  # validates
        self.style = style
        self.every = float(every_n_seconds)
        self.metrics = list(metrics)
        self._stack = contextlib.ExitStack()  # holds the live bar
        self._bar = self._task = None
        self._reset()

    def _reset(self) -> None:
        self._t0 = None          # time of the first training batch (validation at step 0 is not counted)
        self._step0 = 0          # global step then (a resumed run counts from there)
        self._val_s = 0.0        # validation seconds since _t0
        self._t_val = None
        self._last = -math.inf   # time of the last line
        self._last_step = -1     # step of the last line
        self._t_start = time.perf_counter()

    # ------------------------------------------------------------------ numbers
    @staticmethod
    def total(trainer) -> int | None:
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        n, epochs = trainer.num_training_batches, trainer.max_epochs
        if epochs and epochs > 0 and math.isfinite(n):
            return int(epochs * n) // max(1, int(trainer.accumulate_grad_batches))
        return None

    def _numbers(self, trainer) -> tuple[int, int | None, float | None, float | None]:
        """(step, total, steps per second, ETA seconds)."""
        step, total = int(trainer.global_step), self.total(trainer)
        rate = eta = None
        if self._t0 is not None and step > self._step0:
            rate = (step - self._step0) / max(time.perf_counter() - self._t0 - self._val_s, 1e-9)
            if total:
                eta = max(0, total - step) / rate
        return step, total, rate, eta

    def _metric_text(self, trainer) -> str:
        out = []
        for name in self.metrics:
            v = trainer.callback_metrics.get(name)
            if v is not None:
                out.append(f"{name} {float(v):.4g}")
        return " · ".join(out)

    def describe(self, trainer, *, done: bool = False) -> str:
        step, total, rate, eta = self._numbers(trainer)
        parts = [f"step {step}/{total} ({100 * step // total} %)" if total else f"step {step}"]
        if rate is not None:
            parts.append(fmt_rate(rate))
        if done:
            parts.append(f"done in {fmt_duration(time.perf_counter() - self._t_start)}")
        elif eta is not None:
            parts.append(f"ETA {fmt_duration(eta)}")
        if m := self._metric_text(trainer):
            parts.append(m)
        return " · ".join(parts)

    # ------------------------------------------------------------------ output
    def _active(self, trainer) -> bool:
        return self.style != "none" and trainer.is_global_zero

    def _report(self, trainer, *, force: bool = False, done: bool = False) -> None:
        step = int(trainer.global_step)
        if self._bar is not None:
            _, total, rate, eta = self._numbers(trainer)
            info = [fmt_rate(rate) if rate else "", "" if done or eta is None else f"ETA {fmt_duration(eta)}",
                    self._metric_text(trainer)]
            self._bar.update(self._task, completed=step, total=total, info=" · ".join(x for x in info if x))
            return
        now = time.perf_counter()
        due = force or step == self._step0 + 1 or now - self._last >= self.every
        if done or (step != self._last_step and due):
            log.info(self.describe(trainer, done=done))
            self._last, self._last_step = now, step

    def on_train_start(self, trainer, pl_module):
        self._reset()
        self._step0 = int(trainer.global_step)
        if not self._active(trainer) or not use_bar(self.style):
            return
        from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

        self._bar = self._stack.enter_context(live_bar(TextColumn("{task.description}"), BarColumn(),
                                                       MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
                                                       TimeElapsedColumn()))
        self._task = self._bar.add_task(type(pl_module).__name__, total=self.total(trainer), completed=self._step0,
                                        info="")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if self._t0 is None:
            self._t0, self._step0, self._val_s = time.perf_counter(), int(trainer.global_step), 0.0
        elif self._active(trainer):
            self._report(trainer)  # the step just finished (callback_metrics hold its values by now)

    def on_validation_start(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        self._t_val = time.perf_counter()
        if self._active(trainer):
            self._report(trainer, force=True)
            if self._bar is not None:
                self._bar.update(self._task, description=f"{self._bar.tasks[0].description} (validating)")
            else:
                log.info(f"validation at step {trainer.global_step} …")

    def on_validation_end(self, trainer, pl_module):
        if self._t_val is None:
            return
        dt = time.perf_counter() - self._t_val
        if self._t0 is not None:
            self._val_s += dt
        self._t_val = None
        if self._active(trainer):
            if self._bar is not None:
                self._bar.update(self._task, description=self._bar.tasks[0].description.replace(" (validating)", ""))
            else:
                log.info(f"validation at step {trainer.global_step} took {fmt_duration(dt)}")

    def on_train_end(self, trainer, pl_module):
        if self._active(trainer):
            self._report(trainer, force=True, done=True)
        self._close()

    def on_exception(self, trainer, pl_module, exception):
        self._close()

    def _close(self) -> None:
        self._stack.close()
        self._bar = self._task = None


# ---------------------------------------------------------------------- the pipeline


def reference_seconds(recipe, steps: list[str], overrides: list[str], out_dir: Path) -> tuple[dict | None, str]:
    """Seconds per step to scale into the pipeline's ETA, and where they come from.

    The newest earlier finished run in ``out_dir``'s parent folder with the same recipe, steps and command-line
    overrides (``hydra.*`` aside; its ``pipeline_report.json``), else ``recipe.seconds`` (measured for the
    recipe as committed) when the command line changes no ``recipe.*`` or ``labels`` key, else none.
    """
    key = [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]
    reports = sorted(out_dir.parent.glob("*/pipeline_report.json"), key=lambda p: p.stat().st_mtime, reverse=True)
    for p in reports:
        if p.parent == out_dir:
            continue
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        if r.get("recipe") == recipe.get("name") and r.get("steps") == steps and r.get("overrides") == key:
            return {s: float(r["seconds"][s]) for s in steps}, f"run {p.parent.name}"
    ref = recipe.get("seconds")
    changed = any(o.lstrip("+~").startswith(("recipe.", "labels=")) for o in key)
    if ref and not changed and all(s in ref for s in steps):
        return {s: float(ref[s]) for s in steps}, "the recipe's measured times"
    return None, ""


class PipelineProgress:
    """``[k/n step]`` around each recipe step, the child's progress passed through, elapsed and ETA.

    ``reference``: seconds per step (:func:`reference_seconds`); the reference times of the steps not done are
    scaled by how long this run took for the steps done so far against theirs (the current step's time left is at
    least its child's ETA: the child's ETA alone leaves out its validation and export).
    ``bar``: a rich bar per training step (default: when stdout is a terminal), else plain lines.
    """

    #: child log lines shown besides kat.trainer.progress's (steps, validation phases)
    SHOW = ("[kat.trainer.progress]", "validation (mode=", "Error", "error:")

    def __init__(self, steps: list[str], reference: dict[str, float] | None = None, source: str = "",
                 *, bar: bool | None = None):
        self.steps = list(steps)
        self.reference = reference
        self.source = source
        self.bar = sys.stdout.isatty() if bar is None else bar
        self.t0 = time.time()
        self.done: dict[str, float] = {}
        self._step: str | None = None
        self._t_step = self.t0

    def label(self, step: str) -> str:
        k = self.steps.index(step) + 1 if step in self.steps else "?"
        return f"[{k}/{len(self.steps)} {step}]"

    def begin(self, step: str) -> None:
        self._step, self._t_step = step, time.time()
        log.info(f"{self.label(step)} starts · {self.overall()}")

    def finish(self, step: str, seconds: float) -> None:
        self.done[step] = seconds
        self._step = None
        log.info(f"{self.label(step)} done in {fmt_duration(seconds)} · {self.overall()}")

    def remaining(self, current_eta: float | None = None) -> float | None:
        """Seconds left in the pipeline (None without a reference)."""
        ref = self.reference
        if not ref:
            return None
        done_ref = sum(ref[s] for s in self.done if s in ref)
        scale = sum(self.done[s] for s in self.done if s in ref) / done_ref if done_ref > 0 else 1.0
        later = [s for s in self.steps if s not in self.done and s != self._step]
        left = scale * sum(ref.get(s, 0.0) for s in later)
        if self._step is not None:  # the current step: its scaled reference time left, at least its child's ETA
            by_ref = max(0.0, scale * ref.get(self._step, 0.0) - (time.time() - self._t_step))
            left += by_ref if current_eta is None else max(current_eta, by_ref)
        return left

    def overall(self, current_eta: float | None = None) -> str:
        text = f"pipeline {fmt_duration(time.time() - self.t0)}"
        left = self.remaining(current_eta)
        return text if left is None else f"{text}, ≈ {fmt_duration(left)} left ({self.source}, scaled)"

    @contextlib.contextmanager
    def watch(self, step: str):
        """``feed(line)`` for each line of a training step's child: progress lines update the bar (or are printed
        with the pipeline's elapsed time and ETA), validation results and errors are printed."""
        label = self.label(step)
        if not self.bar:
            def feed(line: str) -> None:
                p = parse_line(line)
                if p is not None:
                    print(f"  {label} {p['text']} · {self.overall(p['eta_s'])}", flush=True)
                elif any(s in line for s in self.SHOW):
                    print(f"  {label} {line.rstrip().split(' - ', 1)[-1]}", flush=True)

            yield feed
            return
        from rich.progress import BarColumn, TextColumn, TimeElapsedColumn

        with live_bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                      TimeElapsedColumn()) as bar:
            task = bar.add_task(label, total=None, info=self.overall())

            def feed(line: str) -> None:
                p = parse_line(line)
                if p is not None:
                    rest = p["text"].split(" · ", 1)[1] if " · " in p["text"] else ""
                    info = " · ".join(x for x in (f"{p['step']}/{p['total'] or '?'}", rest, self.overall(p["eta_s"]))
                                      if x)
                    bar.update(task, completed=p["step"], total=p["total"], info=info)
                elif any(s in line for s in self.SHOW):
                    bar.console.print(f"  {label} {line.rstrip().split(' - ', 1)[-1]}", markup=False,
                                      highlight=False)

            yield feed
