"""SGD with momentum and weight decay, and the learning-rate schedules of AlexNet training.

The update is Krizhevsky 2012's (and Caffe's), with the learning rate inside the velocity:
    v <- momentum * v + lr * (g + weight_decay * w)
    w <- w - v
Weight decay applies to weights only; biases get `bias_lr_mult` times the learning rate
(Caffe's 2x). Step, multistep and plateau schedules work on whole epochs (`step //
steps_per_epoch`), cosine on every step (Loshchilov and Hutter 2017, without restarts),
each after an optional linear warm-up that works on fractional epochs (Goyal et al. 2017).
"""
import math

import numpy as np


class SGD:
    def __init__(self, ops, params, momentum=0.9, weight_decay=5e-4, bias_lr_mult=2.0):
        self.ops, self.params = ops, params
        self.momentum, self.weight_decay, self.bias_lr_mult = momentum, weight_decay, bias_lr_mult
        self.velocity = {n: ops.zeros(tuple(p.shape), p.dtype) for n, p in params.items()}

    def step(self, grads, lr):
        # every tensor in one call: on a GPU one launch, not one per tensor
        names = list(self.params)
        biases = [name.endswith(".bias") for name in names]
        self.ops.sgd_momentum_update_many(
            [self.params[n] for n in names], [grads[n] for n in names], [self.velocity[n] for n in names],
            [lr * self.bias_lr_mult if is_bias else lr for is_bias in biases],
            self.momentum, [0.0 if is_bias else self.weight_decay for is_bias in biases])

    def state_dict(self):
        """Momentum buffers on the host; theano_alexnet's users lost them on resume."""
        return {name: self.ops.to_host(v) for name, v in self.velocity.items()}

    def load_state_dict(self, state, source="optimizer state"):
        if set(state) != set(self.velocity):
            raise ValueError(f"{source}: momentum buffers {sorted(set(state) ^ set(self.velocity))} do not match the model")
        for name, v in self.velocity.items():
            self.ops.copy_into(v, self.ops.to_device(np.asarray(state[name], v.dtype)))


class LearningRate:
    """lr(step) for the configured schedule; `plateau` also listens to evaluations."""

    def __init__(self, cfg, steps_per_epoch):
        self.cfg = cfg
        self.steps_per_epoch = max(1, steps_per_epoch)
        self.base = cfg.lr * (cfg.global_batch / cfg.lr_scale_by_batch if cfg.lr_scale_by_batch > 0 else 1.0)
        self.milestones = sorted(int(m) for m in cfg.lr_milestones.split(",")) if cfg.lr_milestones else []
        # plateau state: how many drops so far, the best top-1 and evaluations since it
        self.drops, self.best_top1, self.bad_evals = 0, -math.inf, 0

    def at(self, step):
        cfg = self.cfg
        epoch_f = step / self.steps_per_epoch
        if cfg.warmup_epochs > 0 and epoch_f < cfg.warmup_epochs:
            start = 1.0 / cfg.warmup_start_div
            return self.base * (start + (1.0 - start) * epoch_f / cfg.warmup_epochs)
        if cfg.schedule == "cosine":
            # half a cosine from the end of the warm-up to the end of the last epoch, per step
            done = (epoch_f - cfg.warmup_epochs) / max(cfg.epochs - cfg.warmup_epochs, 1e-9)
            return self.base * 0.5 * (1.0 + math.cos(math.pi * min(done, 1.0)))
        epoch = step // self.steps_per_epoch
        if cfg.schedule == "step":
            drops = epoch // cfg.lr_step_epochs
        elif cfg.schedule == "multistep":
            drops = sum(1 for m in self.milestones if epoch >= m)
        elif cfg.schedule == "plateau":
            drops = self.drops
        else:
            drops = 0
        return self.base * cfg.lr_gamma ** drops

    def report_evaluation(self, top1):
        """Plateau: divide by 1/gamma once top-1 has not improved for `plateau_patience` evaluations."""
        if top1 > self.best_top1:
            self.best_top1, self.bad_evals = top1, 0
            return
        self.bad_evals += 1
        if self.cfg.schedule == "plateau" and self.bad_evals >= self.cfg.plateau_patience:
            self.drops += 1
            self.bad_evals = 0

    def state_dict(self):
        return {"drops": self.drops, "best_top1": self.best_top1, "bad_evals": self.bad_evals}

    def load_state_dict(self, state):
        self.drops = int(state["drops"])
        self.best_top1 = float(state["best_top1"])
        self.bad_evals = int(state["bad_evals"])
