"""The typed config (defaults < TOML < flags) and the optimiser's maths and schedules."""
import math

import numpy as np
import pytest

from mpiconvnet.backends import numpy_backend as ops
from mpiconvnet.config import Config, ConfigError, from_dict, resolve
from mpiconvnet.optim import SGD, LearningRate


def test_a_saved_config_is_not_refused_for_combinations_checked_since():
    # checkpoints from before the combination checks must still resume and evaluate
    saved = Config(schedule="multistep", lr_milestones="").to_dict()
    assert from_dict(saved).schedule == "multistep"
    with pytest.raises(ConfigError, match="needs --lr-milestones"):
        resolve(["--schedule", "multistep"])


def test_a_toml_boolean_is_no_number(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("epochs = true\n")
    with pytest.raises(ConfigError, match="--epochs expects int, got True"):
        resolve(["--config", str(toml)])


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('global_batch = 128\nlr = 0.02\nmodel = "alexnet-mini"\noverlap = false\n')
    cfg = resolve(["--config", str(toml), "--lr", "0.5", "--drop-last", "false"])
    assert (cfg.global_batch, cfg.lr, cfg.model, cfg.overlap, cfg.drop_last) == (128, 0.5, "alexnet-mini", False, False)
    assert cfg.epochs == Config().epochs
    assert from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "2.5"], "--epochs expects int, got '2.5'"),
    (["--nope", "1"], "unknown flag --nope"),
    (["--schedule", "linear"], "--schedule 'linear' is not one of"),
    (["--global-batch", "0"], "--global-batch must be at least 1"),
    (["--lr"], "flag --lr needs a value"),
    (["--lr-milestones", "30,x"], "--lr-milestones"),
    (["--lr-step-epochs", "0"], "--lr-step-epochs must be at least 1"),
    (["--warmup-start-div", "0"], "--warmup-start-div must be positive"),
    (["--prefetch", "0"], "--prefetch must be at least 1"),
    (["--workers", "-1"], "--workers must be at least 0"),
    (["--seed", "-1"], "--seed must be at least 0"),
    (["--momentum", "-5"], "--momentum must be in "),
    (["--lr", "nan"], "--lr expects float, got 'nan'"),
    (["--schedule", "multistep"], "--schedule multistep needs --lr-milestones"),
    (["--schedule", "plateau", "--eval-every", "0"], "--schedule plateau drops the lr"),
    (["--average-every", "4"], "--average-every 4 applies to --sync params only, and this run has --sync grads"),
    (["--async-every", "2", "--sync", "params"], "--async-every 2 applies to --sync async only"),
])
def test_bad_flags_are_named(argv, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(argv)


@pytest.mark.parametrize("argv, note", [
    # model parallel, params and async reduce no gradient buckets; async evaluates at the end
    (["--parallel", "model", "--bucket-mb", "1"], "--bucket-mb 1 has no effect with --sync grads --parallel model "
                                                  "(it applies to the gradient allreduce of --sync grads with "
                                                  "--parallel data or hybrid only)"),
    (["--sync", "async", "--overlap", "false"], "--overlap false has no effect with --sync async"),
    (["--sync", "params", "--average-every", "2", "--overlap", "false"], "--overlap false has no effect"),
    (["--sync", "async", "--eval-every", "3"], "--eval-every 3 has no effect with --sync async --parallel data (it "
                                               "applies to --sync grads and params (--sync async evaluates once"),
])
def test_a_setting_the_mode_ignores_is_noted_not_refused(argv, note):
    # noted, not refused: a job that gave it before the check still resumes with its own command
    notes = []
    resolve(argv, notes=notes)
    assert len(notes) == 1 and notes[0].startswith(note), notes


def test_a_setting_the_mode_ignores_is_named_where_it_was_given(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("average_every = 4\noverlap = false\n")
    with pytest.raises(ConfigError, match=f"average_every = 4 in {toml} applies to --sync params only"):
        resolve(["--config", str(toml)])
    notes = []
    resolve(["--config", str(toml), "--sync", "params"], notes=notes)
    assert notes == [f"overlap = false in {toml} has no effect with --sync params --parallel data (it applies to "
                     f"the gradient allreduce of --sync grads with --parallel data or hybrid only)"]
    with pytest.raises(ConfigError, match="^--average-every 3 applies"):   # a flag over the file's key
        resolve(["--config", str(toml), "--average-every", "3", "--sync", "async"])
    # what each mode does use is silent, and so are the defaults of what it ignores
    notes = []
    assert resolve(["--config", str(toml), "--sync", "params", "--overlap", "true"], notes=notes).average_every == 4
    assert resolve(["--sync", "async", "--eval-every", "0", "--bucket-mb", "25", "--overlap", "true"],
                   notes=notes).sync == "async"
    assert resolve(["--parallel", "hybrid", "--bucket-mb", "4", "--overlap", "false"], notes=notes).bucket_mb == 4
    assert notes == []


def test_bad_toml_key_names_the_file(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text("globalbatch = 1\n")
    with pytest.raises(ConfigError, match=f"{toml}: unknown key 'globalbatch'"):
        resolve(["--config", str(toml)])


def test_sgd_is_krizhevskys_update_with_weight_decay_on_weights_only():
    rng = np.random.default_rng(0)
    params = {"fc.weight": rng.normal(size=(3, 4)), "fc.bias": rng.normal(size=3)}
    start = {k: v.copy() for k, v in params.items()}
    grads = {k: rng.normal(size=v.shape) for k, v in params.items()}
    opt = SGD(ops, params, momentum=0.9, weight_decay=0.1, bias_lr_mult=2.0)
    opt.step(grads, lr=0.5)
    opt.step(grads, lr=0.5)
    for name, lr, wd in (("fc.weight", 0.5, 0.1), ("fc.bias", 1.0, 0.0)):
        w, v = start[name].copy(), np.zeros_like(start[name])
        for _ in range(2):
            v = 0.9 * v + lr * (grads[name] + wd * w)
            w = w - v
        np.testing.assert_allclose(params[name], w, rtol=1e-12)
        np.testing.assert_allclose(opt.state_dict()[name], v, rtol=1e-12)


def schedule(**overrides):
    return LearningRate(resolve([f"--{k.replace('_', '-')}={v}" for k, v in overrides.items()]), steps_per_epoch=10)


def test_step_multistep_and_warmup_schedules():
    s = schedule(lr=0.1, schedule="step", lr_step_epochs=2)
    assert [s.at(e * 10) for e in (0, 1, 2, 4)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    s = schedule(lr=0.1, schedule="multistep", lr_milestones="1,3")
    assert [s.at(e * 10) for e in (0, 1, 2, 3)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    # linear scaling rule and a 2-epoch warm-up from lr/10 (Goyal et al.)
    s = schedule(lr=0.1, schedule="constant", global_batch=512, lr_scale_by_batch=256, warmup_epochs=2)
    assert s.at(0) == pytest.approx(0.02) and s.at(10) == pytest.approx(0.02 + 0.18 / 2) and s.at(20) == pytest.approx(0.2)


def test_the_warm_up_moves_every_step_and_epoch_drops_wait_for_the_epoch_s_first_step():
    # 10 steps an epoch: the warm-up is linear in fractional epochs (Goyal et al.), while
    # step and multistep drop at the first step of an epoch, not at the last step before it
    s = schedule(lr=0.1, schedule="constant", warmup_epochs=2)
    assert s.at(5) == pytest.approx(0.01 + 0.09 * 0.25) and s.at(15) == pytest.approx(0.01 + 0.09 * 0.75)
    s = schedule(lr=0.1, schedule="step", lr_step_epochs=1)
    assert [s.at(step) for step in (9, 10, 19, 20)] == pytest.approx([0.1, 0.01, 0.01, 0.001])
    s = schedule(lr=0.1, schedule="multistep", lr_milestones="2")
    assert [s.at(step) for step in (19, 20)] == pytest.approx([0.1, 0.01])


def test_cosine_falls_from_the_end_of_the_warm_up_to_zero_at_the_last_step():
    s = schedule(lr=0.1, schedule="cosine", epochs=10, warmup_epochs=2)
    assert s.at(0) == pytest.approx(0.01) and s.at(20) == pytest.approx(0.1)
    assert s.at(60) == pytest.approx(0.05)                       # halfway through the 8 cosine epochs
    assert s.at(25) == pytest.approx(0.05 * (1 + math.cos(math.pi * 0.5 / 8)))   # per step, not per epoch
    assert s.at(100) == pytest.approx(0.0, abs=1e-15) and s.at(130) == pytest.approx(0.0, abs=1e-15)


def test_plateau_drops_when_top1_stops_improving_and_survives_a_resume():
    s = schedule(lr=0.1, schedule="plateau", plateau_patience=2)
    for top1 in (0.1, 0.2, 0.2, 0.19):
        s.report_evaluation(top1)
    assert s.at(100) == pytest.approx(0.01)
    t = schedule(lr=0.1, schedule="plateau", plateau_patience=2)
    t.load_state_dict(s.state_dict())
    assert t.at(100) == s.at(100) and not math.isinf(t.best_top1)


def test_plateau_waits_its_whole_patience_again_after_a_drop():
    s = schedule(lr=0.1, schedule="plateau", plateau_patience=2)
    for top1 in (0.5, 0.4, 0.4):     # two evaluations without improvement: the first drop
        s.report_evaluation(top1)
    assert s.at(0) == pytest.approx(0.01)
    s.report_evaluation(0.4)         # one more: not yet, the count starts over at a drop
    assert s.at(0) == pytest.approx(0.01)
    s.report_evaluation(0.45)        # still below the best 0.5: the second drop
    assert s.at(0) == pytest.approx(0.001)


def test_a_plateau_resumed_between_two_bad_evaluations_keeps_its_count():
    s = schedule(lr=0.1, schedule="plateau", plateau_patience=2)
    for top1 in (0.5, 0.4):          # one evaluation without improvement, then a checkpoint
        s.report_evaluation(top1)
    t = schedule(lr=0.1, schedule="plateau", plateau_patience=2)
    t.load_state_dict(s.state_dict())
    for run in (s, t):
        run.report_evaluation(0.4)   # the second: both drop, as the uninterrupted run does
    assert s.at(0) == t.at(0) == pytest.approx(0.01)


def test_help_gives_every_flag_the_comment_on_its_own_line():
    # the help was once read by a regex that ran on past a field without a comment and
    # took the next section's header ("# data") as that field's meaning
    import inspect
    from dataclasses import fields

    from mpiconvnet.config import help_text
    source_lines = inspect.getsource(Config).splitlines()
    help_lines = {line.split()[0]: line for line in help_text().splitlines()}
    for f in fields(Config):
        own_line = next(line for line in source_lines if line.strip().startswith(f"{f.name}:"))
        comment = own_line.split("  # ", 1)[1].strip()
        assert help_lines[f"--{f.name.replace('_', '-')}"].rstrip().endswith(comment), f.name
