"""The training loop, written once: every training program is this loop over its own step and batches.

    state = loop.train(run, state, step, batches, evaluate=evaluate)

A program contributes what is its own: ``step(state, batch, lr=lr) -> (state, metrics)`` (a pure step with
the program's settings bound), ``batches(i)`` (the inputs of loop step ``i`` on this rank, a pure function of ``i``,
which is what makes a resumed run read exactly the batches the uninterrupted one would), and ``evaluate(state,
step, final)``. The loop owns the rest, the same for pre-training, SFT, DPO and GRPO:

- the learning rate of each step (``train.schedule``), the step's wall time, a metrics line per step
  (``metrics.jsonl``, and the trackers of ``train.trackers``: ``Run.record``) and the progress bar;
- checkpoints every ``train.checkpoint_every`` steps, on Ctrl-C, after ``--stop-after`` steps and at the end,
  keeping the newest ``train.keep_checkpoints``; evaluations every ``train.eval_every`` steps, at the start of
  a fresh run and at the end, whose line (written without an evaluation too) records that the run finished;
  a curves plot at the end (drawn again when a finished run is resumed);
- a non-finite loss or gradient norm stops the run. The state it produced is kept for inspection under a name
  no resume or load picks up, and ``latest`` stays on the last good checkpoint, so ``--resume`` restarts from
  there;
- under ``torchrun``, keeping the ranks together: the metrics a step returns are already global, every rank
  takes the same decisions from them, a Ctrl-C any rank sees stops all at the same step, and only rank 0 writes.
  A sharded state is gathered for saving and evaluating (``zmaj.train.parallel``).
"""

import math
import signal
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import Any, Protocol, TypeVar, runtime_checkable

from loguru import logger
from tensordict import TensorDict
from torch import Tensor
from tqdm import tqdm

from zmaj import checkpoint, fileio
from zmaj.train import optim, report
from zmaj.train.runs import RECORDS, Run, RunFailedError, bad_input_exits_2, describe_meta, stop_together

B = TypeVar("B")
B_contra = TypeVar("B_contra", contravariant=True)
Metrics = dict[str, Tensor]


# runtime_checkable: beartype checks parameters annotated with a protocol by isinstance.
@runtime_checkable
class Step(Protocol[B_contra]):
    """``step(state, batch, lr=lr) -> (state, metrics)``: one loop step, e.g. ``partial(train_step, ...)`` with
    everything but the state, batch and learning rate bound; metrics are scalars over all ranks."""

    def __call__(self, state: TensorDict, batch: B_contra, /, *, lr: float) -> tuple[TensorDict, Metrics]: ...


Evaluate = Callable[[TensorDict, int, bool], Mapping[str, object]]
"""``evaluate(state, step, final) -> scores``, run on every rank (it may use collectives); rank 0's scores
go into the metrics file (numbers, and what was evaluated, which trackers leave out). ``final`` is the
end-of-run evaluation, which may look at more."""


class NonFiniteError(RunFailedError):
    """A step's loss or gradient norm was not finite; the message says what was kept and how to go on."""


def train(
    run: Run[Any],
    state: TensorDict,
    step: Step[B],
    batches: Callable[[int], B],
    *,
    evaluate: Evaluate | None = None,
    panels: Sequence[tuple[str, str]] = (("loss", "loss"),),
    show: Sequence[str] = ("loss",),
    updates_per_step: int = 1,
    flops_per_token: float | None = None,
    peak_gflops: float | None = None,
) -> TensorDict:
    """Run loop steps from where ``state`` is to ``train.steps``, then save and evaluate; the final state.

    ``updates_per_step`` is how many optimizer updates one loop step makes (GRPO's passes over a rollout), so
    that a resumed state's update count gives the loop step. ``panels`` are the ``(metric, title)`` curves the
    plot shows, ``show`` the metrics the progress bar shows; with ``flops_per_token`` and ``peak_gflops`` each
    line also reports model FLOP utilisation.
    """
    cfg, parallel = run.train, run.parallel
    main = parallel.main
    checked: int | None = None  # the step whose state check_state last found finite

    def check_state(state: TensorDict, done: int) -> None:
        """Stop where the last update made the state non-finite, before it is saved or evaluated: the step's
        loss and gradient norm, checked as it ended, are those of the state it started from, so a learning rate
        that overflows float32 in the update would otherwise end a run (exit 0) with a model of NaNs as its
        ``latest``, or fail in its evaluation with a traceback. A state resumed from that is not finite (saved
        before zmaj checked) is its checkpoint, which is moved aside."""
        nonlocal checked
        if done == checked:  # saved, then evaluated: the same state
            return
        checked = done
        if parallel.agree(bool(checkpoint.non_finite_leaves(state))):  # each rank checks what it holds
            if done == first:  # (then the checkpoint the run resumed from: it goes aside too)
                what, back = f"the checkpoint of step {done} is not finite", 0
            else:
                what, back = f"the update of step {done} made the state non-finite", None
            stop_on_non_finite(run, state, done, what, updates_per_step=back, name_tensors=True)

    def save(state: TensorDict, done: int) -> None:
        """Rank 0 writes, and every rank learns whether it could: a write that fails (a full disk) stops all of
        them with rank 0's one line, rather than leave the others to die in the next step's collective."""
        check_state(state, done)
        whole = parallel.gather_to_main(state)
        failed: OSError | RunFailedError | None = None
        if whole is not None:
            try:
                # The metrics up to this step first: a power cut that kept the checkpoint and lost their lines
                # would leave steps the resume never records again (it drops only the lines past a checkpoint).
                for record in (run.dir / name for name in RECORDS):
                    if record.is_file():
                        fileio.fsync(record)
                path = checkpoint.save(run.dir, whole, describe_meta(run))
            except checkpoint.CheckpointWriteError as error:  # raised below, once the others know
                failed = error
            except OSError as error:  # the fsync of a record
                failed = RunFailedError(
                    f"could not flush the run's records to disk before a checkpoint ({error})"
                )
            else:
                try:
                    removed = checkpoint.prune(run.dir, cfg.keep_checkpoints)
                except OSError as error:
                    failed = RunFailedError(f"saved {path}, but could not remove older checkpoints ({error})")
                else:
                    logger.info(
                        f"saved {path}"
                        + (f"; removed {', '.join(p.name for p in removed)}" if removed else "")
                    )
        stop_together(parallel, failed, "rank 0 could not save or prune a checkpoint")

    def scores(state: TensorDict, done: int, final: bool = False) -> None:
        # The final line is written without an evaluation too: it records the end (``report.finished``).
        if evaluate is None and not final:
            return
        if evaluate is not None:
            check_state(state, done)
        result = evaluate(state, done, final) if evaluate is not None else {}
        extra = {"final": True, "wall_s": time.perf_counter() - run.started} if final else {}
        run.record({"step": done, **result, **extra})

    if main and (odd := optim.schedule_warning(cfg.steps, cfg.schedule)):
        logger.warning(odd)
    first = int(state["opt", "step"]) // updates_per_step
    if first > cfg.steps:
        raise RunFailedError(
            f"{run.dir} is at step {first}, past train.steps ({cfg.steps}): "
            f"set train.steps to at least {first}"
        )
    if run.resumed:
        check_state(state, first)  # saved by a zmaj that did not check: an optimizer moment may be inf
        run.write_spec()  # checked: the spec it goes on with, so that the next --resume keeps its --set
    # What a resume reads of the run's records is input: damage is one line naming file:line, not a traceback.
    # Rank 0 reads them and tells the others, which learn of damage from it (and exit 2 without a word).
    with bad_input_exits_2(parallel):
        if first == cfg.steps and parallel.from_rank_0(
            lambda: report.has_evaluation(run.metrics, first, final=True)
        ):
            if main:  # drawn again (cheap): one killed after its final evaluation left none, or one cut short
                report.plot_curves(run.metrics, run.dir / "curves.png", panels)
            logger.info(f"{run.dir} finished at step {first}; --set train.steps=N continues it")
            return state
        if run.resumed and (
            dropped := parallel.from_rank_0(lambda: report.drop_records_after(run.metrics, first))
        ):
            # A run killed after its last checkpoint recorded steps it now takes again.
            logger.info(f"dropped {dropped} records past step {first} from {run.metrics}: taken again now")
        due = first == 0 or (first % cfg.eval_every == 0 and first < cfg.steps)
        evaluated = due and parallel.from_rank_0(
            lambda: report.has_evaluation(run.metrics, first, final=False)
        )
    run.begin(first)
    if due and not evaluated:
        scores(state, first)  # a fresh run's first, or one a kill cut off after its step's checkpoint
    bar = tqdm(
        range(first, cfg.steps), initial=first, total=cfg.steps, desc=run.name, unit="step", disable=not main
    )
    with interruptible() as interrupted:
        made = {first: batches(first)} if first < cfg.steps else {}  # step -> its batch, made a step early
        for index in bar:
            done = index + 1
            lr = optim.learning_rate(index, cfg.steps, cfg.optimizer.lr, cfg.schedule)
            tick = time.perf_counter()
            state, metrics = step(state, made.pop(index), lr=lr)
            # The next step's batch is assembled while a GPU still runs this step's queued kernels, which the
            # metrics below wait for: 18 ms of host work a step at the FineWeb spec's 512 rows (on a CPU). A
            # step's "seconds" is the loop's wall time for it, that assembly included.
            if done < cfg.steps:
                made[done] = batches(done)
            values = {key: float(value) for key, value in metrics.items()}  # waits for the step to finish
            record = describe_step(done, lr, values, time.perf_counter() - tick, flops_per_token, peak_gflops)
            run.record(record)
            if main:
                bar.set_postfix({key: f"{values[key]:.3f}" for key in show if key in values})
            if not all(math.isfinite(values.get(key, 0.0)) for key in ("loss", "grad_norm")):
                what = ", ".join(f"{key} {values[key]}" for key in ("loss", "grad_norm") if key in values)
                stop_on_non_finite(run, state, done, f"{what} at step {done}", updates_per_step)
            stop = parallel.agree(interrupted()) or (
                run.stop_after is not None and done - first >= run.stop_after
            )
            if stop and done < cfg.steps:
                save(state, done)
                if done % cfg.eval_every == 0:  # due now: the resumed run starts after this step
                    scores(state, done)
                logger.info(f"stopped at step {done}; continue with --resume {run.dir}")
                return state
            if done % cfg.checkpoint_every == 0 and done < cfg.steps:
                save(state, done)
            if done % cfg.eval_every == 0 and done < cfg.steps:
                scores(state, done)
    bar.close()
    if first < cfg.steps:  # else a run killed in its final evaluation, which is taken again now
        save(state, cfg.steps)
    scores(state, cfg.steps, final=True)
    if main:
        report.plot_curves(run.metrics, run.dir / "curves.png", panels)
        logger.info(f"done in {time.perf_counter() - run.started:.0f}s; run folder {run.dir}")
    return state


def describe_step(
    done: int,
    lr: float,
    values: dict[str, float],
    seconds: float,
    flops_per_token: float | None,
    peak_gflops: float | None,
) -> dict[str, float | int]:
    """A step's metrics line: its metrics, the learning rate and wall time, and with a ``tokens`` count, the
    throughput (and model FLOP utilisation, given the FLOPs per token and the peak). ``tokens`` counts the
    targets the loss counted (``loss_mask``), so both leave out masked positions: one per document boundary in
    packed pre-training, all but the answers in SFT."""
    record: dict[str, float | int] = {"step": done, **values, "lr": lr, "seconds": seconds}
    if "tokens" in values:
        record["tokens_per_s"] = values["tokens"] / seconds
        if flops_per_token is not None and peak_gflops is not None:
            record["mfu"] = record["tokens_per_s"] * flops_per_token / (peak_gflops * 1e9)
    return record


def stop_on_non_finite(
    run: Run[Any],
    state: TensorDict,
    done: int,
    what: str,
    updates_per_step: int | None = None,
    name_tensors: bool = False,
) -> None:
    """Keep the bad state for inspection where nothing resumes from it, and stop every rank with rank 0's
    message (``what`` went wrong, and what to do next), once rank 0 has saved (a rank that left first would have
    ``torchrun`` stop the job under it).

    A non-finite loss or gradient norm of step ``done`` is that of the state the step started from, so when
    that state is the latest checkpoint, resuming there would fail again at the same step: given the
    ``updates_per_step`` that lead back to it, it is set aside too, and ``latest`` goes back to the checkpoint
    before it; without them, the step started from a good state. (Every saved state is checked to be finite, so
    no earlier one needs to be set aside.) ``name_tensors``: the message names those that are not finite."""
    whole = run.parallel.gather_to_main(state)
    message, failed = None, None
    if whole is not None:
        if name_tensors and (bad := checkpoint.non_finite_leaves(whole)):
            what += f" ({checkpoint.named(bad)})"
        try:
            message = _set_aside(run, whole, what, updates_per_step)
        except OSError as error:  # a full disk: raised below, once the others know
            failed = RunFailedError(f"{what}, and {error}")
    stop_together(run.parallel, failed, "rank 0 could not keep the non-finite state")
    if message is not None:
        logger.error(message)
    raise NonFiniteError(run.parallel.broadcast(message), said=True)


def _set_aside(run: Run[Any], whole: TensorDict, what: str, updates_per_step: int | None) -> str:
    """Rank 0's part of :func:`stop_on_non_finite`: the files moved, and the message saying where to go on."""
    step = int(whole["opt", "step"])
    if updates_per_step == 0:  # the checkpoint the run resumed from, moved aside as it is (not saved again)
        moved = checkpoint.set_aside_latest(run.dir, step, "nonfinite")
        message = f"{what}; it is set aside as nonfinite-step-{step:07d} for inspection" if moved else what
    else:
        kept = checkpoint.save_aside(run.dir, whole, describe_meta(run), "nonfinite")
        message = f"{what}; that state is kept in {kept} for inspection"
        if updates_per_step is not None:
            started = step - updates_per_step
            if checkpoint.set_aside_latest(run.dir, started, "nonfinite_start"):
                message += f", and the checkpoint the step started from (step {started}) set aside beside it"
    saved = (run.dir / checkpoint.CHECKPOINTS / checkpoint.LATEST).is_file()
    lower = " (a lower train.optimizer.lr may help)" if updates_per_step != 0 else ""
    then = (
        f"latest is {checkpoint.latest(run.dir).name}: --resume {run.dir} continues from there{lower}"
        if saved
        else "no good checkpoint was saved before it: start again with another --run-dir"
    )
    return f"{message}; {then}"


@contextmanager
def interruptible() -> Iterator[Callable[[], bool]]:
    """Ctrl-C (SIGINT) and SIGTERM set a flag instead of killing the run, so the loop can finish its step and
    save; yields the flag's reader. SIGTERM is what ``torchrun`` sends every rank when it is interrupted, and
    what job schedulers send before they kill a job. The previous handlers come back afterwards."""
    requested = False

    def handle(signum: int, frame: FrameType | None) -> None:
        nonlocal requested
        requested = True
        logger.warning(f"{signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield lambda: requested
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
