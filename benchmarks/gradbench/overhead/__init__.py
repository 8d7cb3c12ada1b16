"""The overhead benchmark: what GradGuard costs per optimizer step (``benchmarks/overhead.py``).


Everything is measured in one process, with every baseline measured in the same run,
interleaved with the method under test (round-robin order rotated every repeat), after a
warm-up, over at least 5 repeats; tables report medians and ratios.

Sections (``--sections``, default all):

``micro``
    Per-step cost of the guard's work alone, ``GuardCore.step()`` (which also updates its
    statistics), against ``torch.nn.utils.clip_grad_norm_(params, 1.0)`` (what
    ``Trainer(gradient_clip_val=1.0)`` runs), ZClip's ``ZClip.step(model)`` and Lightning's
    ``grad_norm(module, norm_type=2)``, on a grid of tensor counts x parameter counts. Every
    method sees the same gradients: they are re-set from a pristine copy before every call
    (outside the timed region), and stateful methods are reset to the same warmed-up state
    before every call, so each timed call does exactly the same work. Two variants: a clean
    step (total norm 0.5: nothing clips) and a spike step (gradients x10, total norm 5: every
    method clips). ``torch._foreach_norm`` (one fused read of the gradients, no decision) is
    reported as the floor.
``e2e``
    ``Trainer.fit`` time per optimizer step on three demo models (``--e2e-models``, run one
    after the other, each with its own warm-up, interleaved configurations and repeats):
    ``DeepMLP`` (width 1024, depth 6, 5.3 M parameters; ``--width/--depth/--batch`` apply to
    it only), ``ResidualMLP`` (width 1024, 3 blocks, 6.35 M) and ``AddingProblemRNN`` (LSTM,
    hidden 256, adding problem with 40 time steps, 0.27 M); the MLPs with BatchNorm and He
    init, all with SGD + momentum (lr 0.01), batch 64 (pinned: ``DEMO_KWARGS``,
    ``RESIDUAL_KWARGS``, ``LSTM_KWARGS``; ``--quick`` shrinks them). Configurations: no
    callback, a bare gradient read (the floor), ``gradient_clip_val=1.0``, ``GradGuard()``,
    ZClip's Lightning callback and ``GradientMonitor()`` (if importable); per-step times come
    from the clocks read at ``on_train_batch_end`` after ``--e2e-warmup`` steps. The time
    spent inside each method's hook is measured too (a direct, low-noise view of the same
    overhead), and the guard's work on each model's own gradients outside Lightning.

Clock: with ``--threads 1`` (default) the calling thread's CPU time (``time.thread_time``),
which all of the work runs on and which ignores time spent descheduled on a shared machine;
wall-clock (``time.perf_counter``) ratios are reported alongside as a cross-check.
``memory``
    Bytes of the guard's persistent state, bytes allocated during one ``step()`` (from
    ``torch.profiler`` with ``profile_memory=True``), a peak-RSS cross-check on the largest

Modules: ``timing`` (interleaved repeats, clocks), ``fixtures`` (parameter sets, gradients,
warmed-up state), one module per section (``micro``, ``e2e``, ``memory``, ``syncs``),
``render`` (the markdown report) and ``cli``. End-to-end configurations are methods of the
registry (:mod:`gradbench.methods`); the models are pinned in :mod:`gradbench.workloads`;
the targets live in :mod:`gradbench.targets`.
"""
