"""finetuning.prodigy.DeviceProdigy against prodigyopt.Prodigy: the same parameters after every
step, for the settings DoRA trains with and the other branches of prodigyopt's step."""

import pytest
import torch
from prodigyopt import Prodigy
from torch.utils._python_dispatch import TorchDispatchMode

from finetuning.prodigy import DeviceProdigy


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*shape, generator=g)) for shape in ((6, 5), (5,), (3, 4, 2))] + \
        [torch.nn.Parameter(torch.zeros(4))]  # an all-zero tensor: prodigyopt keeps a 0-d p0 for it


def _run(cls, kwargs, steps=30, seed=0, zero_first=False):
    ps = _params(seed)
    opt = cls(ps, **kwargs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    g = torch.Generator().manual_seed(seed + 1)
    targets = [torch.randn(p.shape, generator=g) for p in ps]
    out = []
    for step in range(steps):  # a noisy quadratic, so that d grows from d0
        for p, t in zip(ps, targets):
            p.grad = (p.detach() - t + 0.1 * torch.randn(p.shape, generator=g)) * (0.0 if zero_first and step == 0 else 1.0)
        ps[1].grad = None if step == 3 else ps[1].grad  # a parameter without a gradient this step
        opt.step()
        sched.step()
        out.append([p.detach().clone() for p in ps])
    return out, opt


@pytest.mark.parametrize("kwargs", [
    dict(lr=1.0, weight_decay=1e-4, decouple=True, use_bias_correction=True, safeguard_warmup=True),  # DoRA's
    dict(lr=1.0, weight_decay=1e-2, decouple=False),
    dict(lr=0.5, betas=(0.0, 0.99), growth_rate=1.02, d_coef=2.0),
    dict(lr=1.0, slice_p=3, beta3=0.9),
])
def test_device_prodigy_steps_like_prodigyopt(kwargs):
    ours, opt = _run(DeviceProdigy, kwargs)
    ref, ref_opt = _run(Prodigy, kwargs)
    for step, (a, b) in enumerate(zip(ours, ref)):
        for x, y in zip(a, b):
            # float32 rounding of the same formulas (prodigyopt sums in Python floats): relative
            # errors stay about 1e-7 except in entries crossing zero
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert abs(float(opt.param_groups[0]["d"]) - ref_opt.param_groups[0]["d"]) <= 1e-5 * ref_opt.param_groups[0]["d"]
    assert float(opt.param_groups[0]["d"]) > kwargs.get("d0", 1e-6)  # d adapted: the comparison is not trivial


def test_device_prodigy_never_reads_a_number_back():
    class Reads(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:  # .item(), float(t), bool(t)
                Reads.n += 1
            return func(*args, **(kwargs or {}))

    ps = _params(0)
    opt = DeviceProdigy(ps, lr=1.0, weight_decay=1e-4, use_bias_correction=True, safeguard_warmup=True)
    for p in ps:
        p.grad = torch.ones_like(p)
    opt.step()  # the first step creates the state
    with Reads():
        opt.step()
    assert Reads.n == 0


def test_all_zero_gradients_leave_the_parameters_alone_as_prodigyopt():
    ours, _ = _run(DeviceProdigy, dict(lr=1.0), steps=1, zero_first=True)
    ref, _ = _run(Prodigy, dict(lr=1.0), steps=1, zero_first=True)
    before = _params(0)
    for x, y, z in zip(ours[0], ref[0], before):
        assert torch.equal(x, z.detach()) and torch.equal(y, z.detach())
