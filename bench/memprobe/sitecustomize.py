"""Where a training process's memory goes: a probe loaded by every Python process started with this folder first on
PYTHONPATH and MEMPROBE=FILE set (the raw TRL script, and alignkit's root and stage processes alike).

    MEMPROBE=/tmp/x.log PYTHONPATH=bench/memprobe:$PWD python bench/raw_trl.py sft ...
    MEMPROBE=/tmp/y.log PYTHONPATH=bench/memprobe:$PWD python -m alignment.cli run RECIPE --force

A thread samples the process's RSS (/proc/self/statm) every 10 ms. At marked points -- alignkit's planning done
(`procs.serve_one`), `from_pretrained`, `SFTTrainer.__init__` and its `_prepare_dataset`, `Trainer.__init__`, `train`,
after each `training_step`, checkpoint and model saves, exit -- it appends one line per point to FILE: pid,
seconds since start, the point, RSS now, the largest RSS sampled since the last point, VmHWM (the kernel's peak),
glibc's `mallinfo2` over all arenas in MiB (brk: heap bytes, mmap: mmapped chunks, inuse, free: held in the
heap but free) and the number of modules imported. MEMPROBE_INUSE=1 also samples glibc's in-use bytes (the
largest since the last point: `inuse_max_since`). At `train` it writes FILE.json: the trainer's final
arguments, torch threads, parameter dtypes and counts, callbacks, collator and the top-level modules loaded.
Without MEMPROBE nothing is done. bench/README.md, 2026-12-01 02:36, has what it found."""
import os

if os.environ.get("MEMPROBE"):
    import atexit
    import ctypes
    import importlib.abc
    import importlib.util
    import sys
    import threading
    import time

    _FILE = os.environ["MEMPROBE"]
    _PAGE = os.sysconf("SC_PAGE_SIZE")
    _T0 = time.time()
    _state = {"max": 0}
    _INUSE = bool(os.environ.get("MEMPROBE_INUSE"))
    _libc = ctypes.CDLL("libc.so.6")

    class _Mallinfo2(ctypes.Structure):
        _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                   "fsmblks", "uordblks", "fordblks", "keepcost")]

    _libc.mallinfo2.restype = _Mallinfo2

    def _rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE

    def _sampler():
        while True:
            r = _rss()
            if r > _state["max"]:
                _state["max"] = r
            if _INUSE:
                mi = _libc.mallinfo2()
                u = mi.uordblks + mi.hblkhd
                if u > _state.get("umax", 0):
                    _state["umax"] = u
            time.sleep(0.01)

    threading.Thread(target=_sampler, daemon=True).start()
    M = 2**20

    def mark(label):
        r = _rss()
        mx, _state["max"] = max(_state["max"], r), r
        umax, _state["umax"] = _state.get("umax", 0), 0
        hwm = 0
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    hwm = int(line.split()[1]) * 1024
        mi = _libc.mallinfo2()
        with open(_FILE, "a") as f:
            f.write(f"{os.getpid()}\t{time.time() - _T0:7.1f}\t{label:40s}\trss {r / M:6.0f}\tmax_since {mx / M:6.0f}\t"
                    f"hwm {hwm / M:6.0f}\tbrk {mi.arena / M:5.0f}\tmmap {mi.hblkhd / M:5.0f}\tinuse {mi.uordblks / M:5.0f}\t"
                    f"free {mi.fordblks / M:5.0f}\tinuse_max_since {umax / M:5.0f}\tnmods {len(sys.modules)}\n")

    def _wrap(owner, attr, label, before=True, after=True, is_classmethod=False):
        fn = owner.__dict__[attr]
        inner = fn.__func__ if is_classmethod else fn

        def wrapper(*a, **k):
            if before:
                mark(f"{label} <")
            out = inner(*a, **k)
            if after:
                mark(f"{label} >")
            return out

        wrapper.__wrapped__ = inner
        setattr(owner, attr, classmethod(wrapper) if is_classmethod else wrapper)

    def _patch(name, module):
        if name == "transformers.modeling_utils":
            _wrap(module.PreTrainedModel, "from_pretrained", "from_pretrained", is_classmethod=True)
        elif name == "transformers.trainer":
            T = module.Trainer
            _wrap(T, "__init__", "Trainer.__init__")
            _wrap(T, "train", "train")
            inner_train = T.train

            def train(self, *a, **k):
                import json
                import torch
                m = self.model
                info = {"args": self.args.to_dict(), "torch_threads": torch.get_num_threads(),
                        "model_class": type(m).__name__,
                        "dtypes": sorted({str(p.dtype) for p in m.parameters()}),
                        "trainable_dtypes": sorted({str(p.dtype) for p in m.parameters() if p.requires_grad}),
                        "n_trainable": sum(p.numel() for p in m.parameters() if p.requires_grad),
                        "n_params": sum(p.numel() for p in m.parameters()),
                        "grad_ckpt": getattr(m, "is_gradient_checkpointing", None),
                        "callbacks": [type(c).__name__ for c in self.callback_handler.callbacks],
                        "collator": repr(self.data_collator)[:300],
                        "dataset_len": len(self.train_dataset), "dataset_cols": self.train_dataset.column_names,
                        "modules": sorted(n for n in sys.modules if "." not in n)}
                with open(_FILE + ".json", "w") as f:
                    json.dump(info, f, indent=1, default=str)
                return inner_train(self, *a, **k)

            T.train = train
            _state["step"] = 0
            inner = T.__dict__["training_step"]

            def training_step(self, *a, **k):
                out = inner(self, *a, **k)
                _state["step"] += 1
                mark(f"micro-step {_state['step']} >")
                return out

            T.training_step = training_step
            _wrap(T, "_save_checkpoint", "_save_checkpoint")
            _wrap(T, "save_model", "save_model")
        elif name == "trl.trainer.sft_trainer":
            _wrap(module.SFTTrainer, "__init__", "SFTTrainer.__init__")
            _wrap(module.SFTTrainer, "_prepare_dataset", "SFTTrainer._prepare_dataset")
        elif name == "alignment.procs":
            _wrap(module, "serve_one", "serve_one (planned)", after=False)

    _WATCH = {"transformers.modeling_utils", "transformers.trainer", "trl.trainer.sft_trainer", "alignment.procs"}

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _WATCH:
                return None
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None:
                return spec
            loader = spec.loader
            orig = loader.exec_module

            def exec_module(module, _orig=orig, _name=name):
                _orig(module)
                _patch(_name, module)

            loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
    atexit.register(lambda: mark("exit"))
    mark("start " + " ".join(sys.argv)[:60] if sys.argv else "start")
