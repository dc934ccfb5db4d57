"""Prodigy (Mishchenko and Defazio 2023) with its step-size statistics kept on the device.

Offers
    DeviceProdigy(params, **prodigyopt.Prodigy's arguments)   the optimizer DoRA trains with

prodigyopt.Prodigy (1.1.2) reads two numbers back from the GPU for every parameter tensor at every
step (the dot product <g, p0 - p> and |s|_1, through .item()), so a DoRA step on the organism
waits for the GPU about 70 times, and under several processes per GPU each wait is long. This
subclass computes the same update with d, d_max and the numerator as 0-d float64 tensors on the
parameters' device and with torch._foreach_* ops, so a step never waits for the GPU. The
formulas are prodigyopt's (its step(): Adam EMAs scaled by d, s accumulated with (d / d0) * d
under safeguard warm-up, d_hat = d_coef * numerator / |s|_1, d growing at most by growth_rate,
decoupled or coupled weight decay, Adam's bias correction); tests/test_finetune_prodigy.py
checks that both give the same parameters step after step.

One departure, in a case that does not arise in training: when every gradient so far has been
exactly zero (|s|_1 = 0), prodigyopt returns before counting the step; this one leaves the
parameters and d unchanged too, but counts the step (k), which only shifts the bias correction of
later steps. Sharded (FSDP) parameters use prodigyopt's own step.
"""

from __future__ import annotations

import math

import torch
from prodigyopt import Prodigy


class DeviceProdigy(Prodigy):
    """prodigyopt.Prodigy without host synchronisation (see the module doc)."""

    @torch.no_grad()
    def step(self, closure=None):
        first = self.param_groups[0]
        if first["fsdp_in_use"] or any(hasattr(p, "_fsdp_flattened") for g in self.param_groups
                                       for p in g["params"]):
            with torch.enable_grad():
                return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        live = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if not live:
            return loss
        dev = live[0].device
        f64 = dict(device=dev, dtype=torch.float64)

        beta1, beta2 = first["betas"]
        beta3 = first["beta3"] if first["beta3"] is not None else math.sqrt(beta2)
        k = first["k"]
        lr = max(g["lr"] for g in self.param_groups)
        d0, d_coef, growth = first["d0"], first["d_coef"], first["growth_rate"]
        d = torch.as_tensor(first["d"], **f64)
        d_max = torch.as_tensor(first["d_max"], **f64)
        num_old = torch.as_tensor(first["d_numerator"], **f64)
        bias_correction = ((1 - beta2 ** (k + 1)) ** 0.5) / (1 - beta1 ** (k + 1)) \
            if first["use_bias_correction"] else 1.0
        dlr = d * (lr * bias_correction)
        numerator = num_old * beta3
        delta_numerator = torch.zeros((), **f64)
        d_denom = torch.zeros((), **f64)

        work = []  # (group, params, grads, states) of the groups that train
        for group in self.param_groups:
            if group["lr"] not in (lr, 0.0):
                raise RuntimeError("Setting different lr values in different parameter groups is only "
                                   "supported for values of 0")
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            sl = group["slice_p"]
            for p in params:
                state = self.state[p]
                if "step" not in state:  # prodigyopt keeps a 0-d p0 for an all-zero p: same values
                    state["step"] = 0
                    state["s"] = torch.zeros_like(p.flatten()[::sl])
                    state["p0"] = p.flatten()[::sl].detach().clone()
                    if beta1 > 0:
                        state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
            states = [self.state[p] for p in params]
            grads = [p.grad for p in params]
            if group["weight_decay"] != 0 and not group["decouple"]:
                torch._foreach_add_(grads, params, alpha=group["weight_decay"])
            work.append((group, params, grads, states))
            if group["lr"] <= 0.0:
                continue
            sliced = [g.flatten()[::sl] for g in grads]
            gaps = torch._foreach_sub([s["p0"] for s in states], [p.flatten()[::sl] for p in params])
            dots = torch.stack([torch.dot(a, b).double() for a, b in zip(sliced, gaps)])
            delta_numerator = delta_numerator + (d / d0) * dlr * dots.sum()
            dtype = grads[0].dtype
            if beta1 > 0:
                avgs = [s["exp_avg"] for s in states]
                torch._foreach_mul_(avgs, beta1)
                torch._foreach_add_(avgs, torch._foreach_mul(grads, (d * (1 - beta1)).to(dtype)))
            sqs = [s["exp_avg_sq"] for s in states]
            torch._foreach_mul_(sqs, beta2)
            torch._foreach_addcmul_(sqs, torch._foreach_mul(grads, (d * d * (1 - beta2)).to(dtype)), grads)
            ss = [s["s"] for s in states]
            torch._foreach_mul_(ss, beta3)
            coef = (d / d0) * (d if group["safeguard_warmup"] else dlr)
            torch._foreach_add_(ss, torch._foreach_mul(sliced, coef.to(dtype)))
            d_denom = d_denom + torch.stack(torch._foreach_norm(ss, 1)).double().sum()

        moved = d_denom != 0  # prodigyopt returns here when it is 0 (see the module doc)
        num_new = numerator + delta_numerator
        if lr > 0.0:
            d_hat = d_coef * num_new / torch.where(moved, d_denom, torch.ones_like(d_denom))
            d_new = torch.where(d == d0, torch.maximum(d, d_hat), d)
            d_max_new = torch.maximum(d_max, d_hat)
            d_new = torch.minimum(d_max_new, d_new * growth)
        else:
            d_hat, d_new, d_max_new = d, d, d_max
        d_next = torch.where(moved, d_new, d)
        d_max_next = torch.where(moved, d_max_new, d_max)
        num_next = torch.where(moved, num_new, num_old)
        step_lr = torch.where(moved, dlr, torch.zeros_like(dlr))
        for group in self.param_groups:
            group.update(d_numerator=num_next, d_denom=d_denom, d=d_next, d_max=d_max_next, d_hat=d_hat)
        for group, params, grads, states in work:
            dtype = params[0].dtype
            for s in states:
                s["step"] += 1
            denom = torch._foreach_sqrt([s["exp_avg_sq"] for s in states])
            eps = (d_next * group["eps"]).to(dtype)  # _foreach_add_(list, tensor) reads it back
            torch._foreach_add_(denom, [eps.expand_as(t) for t in denom])
            if group["weight_decay"] != 0 and group["decouple"]:
                torch._foreach_add_(params, torch._foreach_mul(params, (-group["weight_decay"] * step_lr).to(dtype)))
            if beta1 > 0:
                upd = torch._foreach_div([s["exp_avg"] for s in states], denom)
                torch._foreach_mul_(upd, (-step_lr).to(dtype))
            else:
                upd = torch._foreach_div(grads, denom)
                torch._foreach_mul_(upd, (-step_lr * d_next).to(dtype))
            torch._foreach_add_(params, upd)
        for group in self.param_groups:
            group["k"] = k + 1
        return loss
