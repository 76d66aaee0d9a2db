"""Run: python tests/optim_sweep.py (not collected by pytest; the cases it sweeps are unit-tested in
tests/test_optim.py).

Adversarial sweep of the fused optimizer's inputs (issue 11 items 1 and 9; item 4 runs in
tests/test_distributed.py):
each case either holds (equals torch.optim / behaves as documented) or is refused with an error
naming the op and the argument; anything else (a crash, a torch-internal error, a silent
difference) is a miss."""
import copy, os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import torch
import lwkd_fast as lw
from lwkd_fast import ops, rule
from lwkd_fast.optim import LayerwiseSGD, LayerwiseAdamW

try:  # the CUDA kernels through the CPU execution layer, where it builds
    from lwkd_fast import cuda_emu

    cuda_emu.load()
except Exception as exc:  # (a missing compiler, or no source checkout)
    print(f"cuda_emu not loaded: {exc}")
BACKENDS = [b for b in ops.BACKENDS if ops.backend_status(b, "layerwise_sgd_step", "cpu")[0]]
KEYS = {"sgd": ["momentum_buffer"], "adamw": ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"]}


def params():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(4, 3, 3, 3, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            torch.randn(3, 7, generator=g).requires_grad_()]


def make(kind, ps, **kw):
    cls = LayerwiseSGD if kind == "sgd" else LayerwiseAdamW
    cfg = dict(lr=0.05, momentum=0.9) if kind == "sgd" else dict(lr=1e-2, amsgrad=True)
    cfg.update(kw)
    return cls([{"params": ps[:2], "layer": 0}, {"params": ps[2:], "layer": None}], **cfg)


def grads(ps, seed=1):
    g = torch.Generator().manual_seed(seed)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g).to(p.dtype)


def stepped(kind, backend):
    ps = params(); opt = make(kind, ps)
    grads(ps)
    with lw.use_backend(backend):
        opt.step(torch.tensor([0.5]))
    return ps, opt


def refused(fn, *words):
    try:
        fn()
    except Exception as e:
        msg = str(e)
        return ("refused" if all(w in msg for w in words) else f"MISS (unclear error: {type(e).__name__}: {msg[:120]})")
    return "MISS (no error)"


def cases(kind, backend):
    out = {}
    D = torch.tensor([0.5])
    # 1-2: state tensors of another shape / dtype, bypassing our loader
    for key in KEYS[kind]:
        for what, bad in (("shape", lambda v: torch.zeros(v.shape[0] + 1, *v.shape[1:])),
                          ("dtype", lambda v: v.double()), ("int dtype", lambda v: v.to(torch.int32)),
                          ("flat", lambda v: v.reshape(-1)), ("not a tensor", lambda v: 0.0)):
            ps, opt = stepped(kind, backend)
            opt.state[ps[0]][key] = bad(opt.state[ps[0]][key])  # assigned directly (torch's loader would cast)
            opt._version += 1
            grads(ps, 2)
            def go():
                with lw.use_backend(backend):
                    opt.step(D)
            out[f"state {key} {what}"] = refused(go, "step", key, "param_groups[0]['params'][0]")
    # 3: the parameter changes under the optimizer
    for what, change in (("shrunk", lambda p: p.data[:2]), ("grown", lambda p: torch.zeros(6, 3, 3, 3)),
                         ("float64", lambda p: p.data.double()), ("float16", lambda p: p.data.half()),
                         ("bfloat16", lambda p: p.data.bfloat16())):
        ps, opt = stepped(kind, backend)
        ps[0].data = change(ps[0])
        grads(ps, 2)
        def go():
            with lw.use_backend(backend):
                opt.step(D)
        out[f"param {what} after stepping"] = refused(go, "step", "param_groups[0]['params'][0]", "shape")
    # 4: checkpoints of another model through our loader
    for what, shape in (("bigger", (4, 3, 5, 5)), ("fewer channels", (2, 3, 3, 3)), ("flat", (108,))):
        ps, opt = stepped(kind, backend)
        sd = opt.state_dict()
        other = params(); other[0] = torch.zeros(shape, requires_grad=True)
        o2 = make(kind, other)
        out[f"checkpoint of another model ({what})"] = refused(lambda: o2.load_state_dict(sd), "load_state_dict",
                                                               "param_groups[0]['params'][0]", "another model")
    # 5: AdamW state without a key; step count of another shape
    if kind == "adamw":
        for key in ("exp_avg", "step"):
            ps, opt = stepped(kind, backend)
            del opt.state[ps[0]][key]
            opt._version += 1
            grads(ps, 2)
            def go():
                with lw.use_backend(backend):
                    opt.step(D)
            out[f"state without {key}"] = refused(go, "lacks", key)
        ps, opt = stepped(kind, backend)
        opt.state[ps[0]]["step"] = torch.zeros(3); opt._version += 1
        grads(ps, 2)
        def go():
            with lw.use_backend(backend):
                opt.step(D)
        out["step count of shape (3,)"] = refused(go, "state['step']", "one-element")
    # 6: discrepancies / found_inf that do not fit
    for what, d, fi, words in (("D of length 2", torch.ones(2), None, ("discrepancies", "(1,)")),
                               ("D int", torch.ones(1, dtype=torch.long), None, ("discrepancies", "dtype")),
                               ("D 2-D", torch.ones(1, 1), None, ("discrepancies", "shape")),
                               ("D on meta", torch.ones(1, device="meta"), None, ("discrepancies", "meta")),
                               ("found_inf float64", D, torch.zeros((), dtype=torch.float64), ("found_inf", "float32")),
                               ("found_inf (2,)", D, torch.zeros(2), ("found_inf", "0-dim")),
                               ("found_inf int", D, torch.zeros((), dtype=torch.int32), ("found_inf", "dtype")),
                               ("found_inf a float", D, 1.0, ("found_inf", "tensor"))):
        ps, opt = stepped(kind, backend)
        grads(ps, 2)
        def go():
            with lw.use_backend(backend):
                opt.step(d, found_inf=fi)
        out[what] = refused(go, *words)
    # 7: what must hold: non-dense parameters, a layout change, against torch.optim
    def holds(make_ps, mutate=None):
        a, b = make_ps(), make_ps()
        ours = make(kind, a)
        tcls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
        tcfg = dict(lr=0.05 * 1.0, momentum=0.9) if kind == "sgd" else dict(lr=1e-2, amsgrad=True)
        ref = tcls([{"params": b[:2]}, {"params": b[2:]}], **tcfg, foreach=False)
        for s in range(3):
            if mutate and s == 1:
                mutate(a); mutate(b)
            for x, y in zip(a, b):
                gr = torch.randn(x.shape, generator=torch.Generator().manual_seed(s))
                x.grad, y.grad = gr.clone(), gr.clone()
            with lw.use_backend(backend):
                ours.step(torch.tensor([1.0]))  # K = 1: factor stays 1, rate = lr
            ref.step()
        ok = all(torch.allclose(x, y, rtol=1e-5, atol=1e-6) for x, y in zip(a, b))
        return "held" if ok else "MISS (differs from torch.optim)"
    base = lambda: [torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(7)), torch.randn(5), torch.randn(3, 7)]
    for what, fn in (("sliced [:, ::2]", lambda t: t[:, ::2]), ("sliced [::2]", lambda t: t[::2]),
                     ("transposed + sliced", lambda t: t.transpose(0, 1)[:, 1:]),
                     ("narrow last dim", lambda t: t[..., :2]), ("permuted (dense)", lambda t: t.permute(3, 2, 1, 0))):
        def mk(fn=fn):
            torch.manual_seed(3)
            ts = [torch.randn(8, 6, 3, 3), torch.randn(5), torch.randn(3, 7)]
            return [fn(ts[0]).detach().requires_grad_(), ts[1].requires_grad_(), ts[2].requires_grad_()]
        try:
            out[f"non-dense parameter {what}"] = holds(mk)
        except Exception as e:
            out[f"non-dense parameter {what}"] = f"MISS ({type(e).__name__}: {str(e)[:100]})"
    def to_cl(ps):
        ps[0].data = ps[0].data.contiguous(memory_format=torch.channels_last)
    def mk2():
        torch.manual_seed(3)
        return [torch.randn(4, 3, 3, 3).requires_grad_(), torch.randn(5).requires_grad_(), torch.randn(3, 7).requires_grad_()]
    out["layout change to channels_last between steps"] = holds(mk2, to_cl)
    return out


total = {}
for backend in BACKENDS:
    res = {}
    for kind in ("sgd", "adamw"):
        for k, v in cases(kind, backend).items():
            res[f"{kind}: {k}"] = v
    held = sum(v == "held" for v in res.values()); ref = sum(v == "refused" for v in res.values())
    misses = {k: v for k, v in res.items() if v.startswith("MISS")}
    print(f"{backend}: {len(res)} cases, {held} held, {ref} refused with a named error, {len(misses)} missed")
    for k, v in misses.items():
        print("   ", k, "->", v)
