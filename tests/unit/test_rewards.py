"""Rewards: each family on hand-written examples, spec building and its errors, combining, and the
code sandbox against hostile programs (each must score 0, within its limits, and leave the test
process -- standing in for the trainer -- untouched)."""
from __future__ import annotations

import doctest
import functools
import os
import pickle
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import rewards
from rewards import REWARDS, build_reward, combine_rewards, score
from rewards.code import code_exec, extract_code
from rewards.format import format_reward
from rewards.length import length_penalty
from rewards.math import math_accuracy
from rewards.model import reward_model, set_stage_model_loader
from rewards.sandbox import MARKER, isolation_error, run_python


needs_box = pytest.mark.skipif(isolation_error() is not None,
                               reason=f"this machine cannot build the sandbox: {isolation_error()}")


def chat(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


# ---------------------------------------------------------------- contract and registry


def test_registered_names():
    assert {"math_accuracy", "format", "length", "code_exec", "reward_model"} <= set(REWARDS.names())


@pytest.mark.parametrize("module", [rewards, rewards.base, rewards.format, rewards.length, rewards.math,
                                    rewards.code, rewards.sandbox])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0


# ---------------------------------------------------------------- math_accuracy


def test_math_accuracy_boxed_and_plain_numbers():
    completions = [
        r"The answer is \boxed{42}.",
        "2 + 40 = 42, so it is 42",
        r"so \boxed{\frac{2}{4}}",  # symbolic: 2/4 == 1/2
        r"\boxed{41}",
        "<think>maybe 7</think><answer>42</answer>",  # the <answer> tag wins over numbers before it
    ]
    golds = ["42", "42", r"\frac{1}{2}", "42", "42"]
    assert math_accuracy(None, completions, answer=golds) == [1.0, 1.0, 1.0, 0.0, 1.0]


def test_math_accuracy_conversational_and_column_param():
    completions = [chat(r"\boxed{3}"), chat("it is 4")]
    assert math_accuracy(None, completions, column="solution", solution=["3", "3"]) == [1.0, 0.0]


def test_math_accuracy_none_when_gold_missing():
    assert math_accuracy(None, ["1", "1", "1"], answer=[None, "", "1"]) == [None, None, 1.0]


def test_math_accuracy_last_number_fallback():
    # math-verify cannot parse this gold; the last numbers (3 vs 3, 3 vs 4) decide. No number: None.
    golds = [r"\text{3 apples}", r"\text{3 apples}", r"\text{three}"]
    assert math_accuracy(None, ["I count 3", "I count 4", "3"], answer=golds) == [1.0, 0.0, None]


def test_math_accuracy_off_main_thread():
    # math-verify's signal.alarm timeout only works in the main thread; the reward turns it off.
    out = []
    t = threading.Thread(target=lambda: out.append(math_accuracy(None, [r"\boxed{5}"], answer=["5"])))
    t.start()
    t.join()
    assert out == [[1.0]]


def test_math_accuracy_missing_column_names_the_fix():
    with pytest.raises(KeyError, match=r"column 'answer'.*columns: solution.*set `column:`"):
        math_accuracy(None, ["1"], solution=["1"], trainer_state=None)


# ---------------------------------------------------------------- format


def test_format_default_pattern():
    completions = [
        "<think>\n2 + 2\n</think>\n<answer>4</answer>",
        "  <think>x</think><answer>4</answer>\n",  # outer whitespace is ignored
        "<answer>4</answer>",
        "<think>x</think><answer>4</answer> and more",
        chat("<think>x</think><answer>4</answer>"),
    ]
    assert format_reward(None, completions) == [1.0, 1.0, 0.0, 0.0, 1.0]


def test_format_search_and_custom_pattern():
    completions = ["text <answer>4</answer> text", "no tags"]
    assert format_reward(None, completions, pattern=r"<answer>\d+</answer>", fullmatch=False) == [1.0, 0.0]
    assert format_reward(None, completions, pattern=r"<answer>\d+</answer>") == [0.0, 0.0]


def test_format_bad_regex():
    with pytest.raises(ValueError, match="invalid regex"):
        format_reward(None, ["x"], pattern="(")


# ---------------------------------------------------------------- length


def test_length_boundaries():
    # L = 10, C = 4: 0 up to n = 6, then (6 - n) / 4 down to -1 at n = 10, -1 beyond.
    lengths = [0, 6, 7, 8, 10, 11, 100]
    got = length_penalty(None, ["a" * n for n in lengths], max_length=10, cache_length=4)
    assert got == [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0]


def test_length_conversational_and_cache_equal_max():
    # C = L: the ramp starts at 0 characters.
    assert length_penalty(None, [chat("ab"), chat("")], max_length=4, cache_length=4) == [-0.5, 0.0]


@pytest.mark.parametrize("cache_length", [0, 11])
def test_length_rejects_bad_cache(cache_length):
    with pytest.raises(ValueError, match="0 < cache_length <= max_length"):
        length_penalty(None, ["a"], max_length=10, cache_length=cache_length)


def test_length_in_tokens(tmp_path):
    from alignment.testing import make_tokenizer

    make_tokenizer().save_pretrained(tmp_path)
    # "<|im_end|>" is 10 characters but one token of the character-level test tokenizer.
    text = "ab<|im_end|>"
    assert length_penalty(None, [text], max_length=4, cache_length=2) == [-1.0]  # 12 chars
    assert length_penalty(None, [text], max_length=4, cache_length=2, tokenizer=str(tmp_path)) == [-0.5]  # 3 tokens


# ---------------------------------------------------------------- build_reward


def test_build_reward_binds_params_and_names_the_function():
    fn = build_reward({"name": "format", "weight": 0.2, "pattern": r"\d+"})
    # TRL names rewards by __name__ (unwrapping functools.partial) and pickles them for its
    # async rollout worker.
    assert fn.__name__ == "format" and not isinstance(fn, functools.partial)
    assert fn(prompts=["q", "q"], completions=["42", "x"], trainer_state=None) == [1.0, 0.0]
    clone = pickle.loads(pickle.dumps(fn))
    assert clone.__name__ == "format" and clone(prompts=["q"], completions=["12"]) == [1.0]


def test_build_reward_unknown_name_lists_known():
    with pytest.raises(ValueError) as e:
        build_reward({"name": "fromat"})
    msg = str(e.value)
    assert "unknown reward 'fromat'" in msg and "did you mean 'format'" in msg
    for name in REWARDS.names():
        assert name in msg


def test_build_reward_unknown_param_suggests_closest():
    with pytest.raises(ValueError) as e:
        build_reward({"name": "format", "patern": "x"})
    msg = str(e.value)
    assert "reward 'format' has no parameter 'patern' (did you mean 'pattern'?)" in msg
    assert "its parameters: pattern, fullmatch" in msg


def test_build_reward_private_param_not_settable():
    with pytest.raises(ValueError, match="has no parameter '_loader'"):
        build_reward({"name": "reward_model", "stage": "rm", "_loader": None})


def test_build_reward_missing_required_param():
    with pytest.raises(ValueError, match="reward 'length' needs parameter 'max_length'.*needs parameter 'cache_length'"):
        build_reward({"name": "length"})


def test_build_reward_bad_weight():
    with pytest.raises(ValueError, match="weight must be a number, got 'high'"):
        build_reward({"name": "format", "weight": "high"})


def test_build_reward_column_clash_is_refused():
    fn = build_reward({"name": "math_accuracy", "column": "gold"})
    with pytest.raises(ValueError, match=r"column\(s\) \['column'\]"):
        fn(prompts=["q"], completions=["1"], gold=["1"], column=["x"])


USER_MODULE = '''
def shout(prompts, completions, *, bonus=0.0, **columns):
    return [float(c.isupper()) + bonus for c in completions]

def no_kwargs(prompts, completions):
    return [0.0 for _ in completions]

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_user_rewards.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_user_rewards"
    sys.modules.pop("my_user_rewards", None)


@pytest.mark.parametrize("sep", [":", "."])
def test_build_reward_import_path(user_module, sep):
    name = f"{user_module}{sep}shout"
    fn = build_reward({"name": name, "bonus": 0.5})
    assert fn.__name__ == name
    assert fn(prompts=["q", "q"], completions=["HI", "hi"]) == [1.5, 0.5]
    with pytest.raises(ValueError, match="has no parameter 'bonnus' \\(did you mean 'bonus'\\?\\)"):
        build_reward({"name": name, "bonnus": 1})


def test_build_reward_import_path_errors(user_module):
    with pytest.raises(ImportError, match="cannot import module 'no_such_pkg.mod'"):
        build_reward({"name": "no_such_pkg.mod:fn"})
    with pytest.raises(ValueError, match="has no 'shuot' \\(did you mean 'shout'\\?\\)"):
        build_reward({"name": f"{user_module}:shuot"})
    with pytest.raises(ValueError, match="not a function"):
        build_reward({"name": f"{user_module}:NOT_A_FUNCTION"})
    with pytest.raises(ValueError, match=r"fn\(prompts, completions, \*\*columns\)"):
        build_reward({"name": f"{user_module}:no_kwargs"})


def test_registry_override_is_used_and_restored():
    def fake(prompts, completions, **columns):
        return [0.5] * len(completions)

    with REWARDS.override("format", fake):
        assert build_reward({"name": "format"})(prompts=[], completions=["x"]) == [0.5]
    assert build_reward({"name": "format"})(prompts=[], completions=["x"]) == [0.0]


# ---------------------------------------------------------------- combine_rewards and score


def test_combine_and_score_weighted_none_counts_zero():
    funcs, weights = combine_rewards([
        {"name": "math_accuracy", "weight": 1.0},
        {"name": "format", "weight": 0.2},
        {"name": "length", "weight": 0.5, "max_length": 40, "cache_length": 10},
    ])
    assert [f.__name__ for f in funcs] == ["math_accuracy", "format", "length"]
    assert weights == [1.0, 0.2, 0.5]
    completions = [
        "<think>ok</think><answer>4</answer>",  # 35 chars: right, formatted, length (30-35)/10
        "4",                                    # right, unformatted
        "<think>ok</think><answer>5</answer>",  # wrong (gold missing -> None)
    ]
    total, per_fn = score(funcs, weights, ["q"] * 3, completions, answer=["4", "4", None])
    assert per_fn == {
        "math_accuracy": [1.0, 1.0, None],
        "format": [1.0, 0.0, 1.0],
        "length": [-0.5, 0.0, -0.5],
    }
    # 1*1 + 0.2*1 + 0.5*(-0.5) = 0.95;  1*1 + 0 + 0 = 1.0;  None -> 0, + 0.2 - 0.25 = -0.05
    assert total == pytest.approx([0.95, 1.0, -0.05])


def test_combine_rewards_reports_every_bad_spec_with_its_index():
    with pytest.raises(ValueError) as e:
        combine_rewards([{"name": "format"}, {"name": "lenght"}, {"name": "format", "patern": "x"}])
    msg = str(e.value)
    assert "rewards[1]: unknown reward 'lenght' (did you mean 'length'?)" in msg
    assert "rewards[2]: reward 'format' has no parameter 'patern'" in msg


def test_combine_rewards_refuses_duplicates_and_empty():
    with pytest.raises(ValueError, match="'format' is listed 2 times"):
        combine_rewards([{"name": "format"}, {"name": "format", "fullmatch": False}])
    with pytest.raises(ValueError, match="no rewards given"):
        combine_rewards([])


def test_score_checks_lengths():
    def short(prompts, completions, **columns):
        return [1.0]

    with pytest.raises(ValueError, match="reward 'short' returned 1 scores for 2 completions"):
        score([short], [1.0], ["q", "q"], ["a", "b"])


# ---------------------------------------------------------------- reward_model


def fake_loader(calls):
    def load(stage):
        calls.append(stage)
        return lambda prompts, completions: [float(len(c)) for c in completions]

    return load


def test_reward_model_with_explicit_loader():
    calls = []
    assert reward_model(["q", "q"], ["ab", "abc"], stage="rm", _loader=fake_loader(calls)) == [2.0, 3.0]
    assert calls == ["rm"]


def test_reward_model_hook_is_cached_per_stage():
    calls = []
    set_stage_model_loader(fake_loader(calls))
    try:
        fn = build_reward({"name": "reward_model", "stage": "rm"})
        assert fn.__name__ == "reward_model"
        assert fn(prompts=["q"], completions=["abcd"]) == [4.0]
        assert fn(prompts=["q"], completions=["a"]) == [1.0]
        assert calls == ["rm"]  # loaded once
    finally:
        set_stage_model_loader(None)


def test_reward_model_without_loader_says_how_to_fix():
    with pytest.raises(RuntimeError, match="set_stage_model_loader"):
        reward_model(["q"], ["a"], stage="rm")


def test_reward_model_needs_stage_and_checks_count():
    with pytest.raises(ValueError, match="needs parameter 'stage'"):
        build_reward({"name": "reward_model"})
    with pytest.raises(ValueError, match="returned 1 scores for 2"):
        reward_model(["q", "q"], ["a", "b"], stage="rm", _loader=lambda s: lambda p, c: [0.0])


# ---------------------------------------------------------------- code_exec


SOLUTION = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
TESTS = "assert add(1, 2) == 3\nassert add(-1, 1) == 0"


def test_extract_code_prefers_last_python_block():
    text = "```python\nx = 1\n```\n```text\nnot code\n```\n```py\nx = 2\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("```\ny = 3\n```") == "y = 3\n"
    assert extract_code("no code") is None


@needs_box
def test_code_exec_pass_fail_and_not_applicable():
    wrong = SOLUTION.replace("a + b", "a - b")
    completions = [SOLUTION, chat(SOLUTION), wrong, "no code block", SOLUTION]
    tests = [TESTS, [TESTS], TESTS, TESTS, None]
    assert code_exec(None, completions, tests=tests) == [1.0, 1.0, 0.0, 0.0, None]


@needs_box
def test_code_exec_early_exit_does_not_pass():
    hack = "```python\nimport sys\ndef add(a, b):\n    return 0\nsys.exit(0)\n```"
    hack2 = "```python\nimport os\nos._exit(0)\n```"
    assert code_exec(None, [hack, hack2], tests=[TESTS, TESTS]) == [0.0, 0.0]


def block(code: str) -> str:
    return f"```python\n{textwrap.dedent(code)}\n```"


HOSTILE = {
    "infinite_loop": "while True:\n    pass",
    "sleep": "import time\ntime.sleep(60)",
    "alloc_10gb": "x = bytearray(10 * 1024 ** 3)",
    "fork_bomb": "import os\nwhile True:\n    os.fork()",
    "connect_outside": "import socket\nsocket.create_connection(('192.0.2.1', 80), timeout=1)",
    "kill_parent": "import os, signal\nos.kill({sentinel}, signal.SIGKILL)\nos.kill(os.getppid(), signal.SIGKILL)",
    "segfault": "import ctypes\nctypes.string_at(0)",
}


@pytest.fixture
def sentinel():
    """A process of the trainer's user standing in for the trainer: hostile code must not touch it."""
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


@needs_box
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_code_exec_hostile_programs_score_zero(name, sentinel):
    if name in ("fork_bomb", "kill_parent") and os.geteuid() != 0:
        pytest.skip("the process limit and signal isolation rely on the sandbox dropping root")
    start = time.monotonic()
    got = code_exec(None, [block(HOSTILE[name].format(sentinel=sentinel.pid))], tests=["pass"],
                    timeout_s=2, cpu_s=1)
    assert got == [0.0]
    assert time.monotonic() - start < 4
    assert sentinel.poll() is None, "the sandboxed code killed a process of the trainer's user"


# ---------------------------------------------------------------- the sandbox itself


@needs_box
def test_sandbox_runs_code_and_cleans_up():
    r = run_python("import os\nprint(sorted(os.listdir('.')), os.getcwd())")
    assert r.ok and r.returncode == 0 and not r.timed_out
    assert r.stdout.startswith("['main.py']") and MARKER in r.stdout
    workdir = r.stdout.split()[-1]
    assert not os.path.exists(workdir)


@needs_box
def test_sandbox_wall_clock_timeout():
    r = run_python("import time\ntime.sleep(60)", timeout_s=1)
    assert r.timed_out and not r.ok and r.returncode == -signal.SIGKILL
    assert r.duration_s < 3


@needs_box
def test_sandbox_cpu_limit():
    r = run_python("while True:\n    pass", timeout_s=4, cpu_s=1)
    assert not r.ok
    # SIGXCPU at the soft limit; under heavy load the wall clock may strike first.
    assert r.returncode in (-signal.SIGXCPU, -signal.SIGKILL)
    assert r.duration_s < 5


@needs_box
def test_sandbox_memory_limit():
    r = run_python("x = bytearray(10 * 1024 ** 3)\nprint('allocated')", memory_mb=256)
    assert not r.ok and "MemoryError" in r.stderr and "allocated" not in r.stdout


@needs_box
def test_sandbox_output_is_capped():
    r = run_python("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)", max_output_bytes=100_000)
    assert not r.ok and len(r.stdout) <= 100_000


@needs_box
def test_sandbox_hides_trainer_environment(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    r = run_python("import os\nprint(os.environ.get('HF_TOKEN'))")
    assert r.stdout == "None\n"


@needs_box
@pytest.mark.skipif(os.geteuid() != 0, reason="only bounded when the sandbox drops root")
def test_sandbox_fork_bomb_is_bounded_and_killed():
    # Every child leaves the process group (setsid) and reports its pid; none may survive.
    code = textwrap.dedent("""
        import os
        while True:
            try:
                pid = os.fork()
            except OSError:
                continue
            if pid == 0:
                os.setsid()
                print(os.getpid(), flush=True)
    """)
    r = run_python(code, timeout_s=2, max_procs=16)
    assert not r.ok and r.duration_s < 4
    pids = [int(p) for p in r.stdout.split()]
    assert 0 < len(pids) <= 16  # RLIMIT_NPROC held (the kernel's exact count is not ours to pin)
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                state = next(line for line in f if line.startswith("State:"))
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read()
        except (OSError, StopIteration):
            continue  # gone
        assert "Z" in state or MARKER.encode() not in cmdline, f"sandbox process {pid} survived"


def _escape_scores(code: str) -> float:
    """code_exec's score for a completion whose only task is `code` (succeeds if the access does)."""
    return code_exec(None, [block(code)], tests=["pass"], timeout_s=5)[0]


@needs_box
@pytest.mark.parametrize("shared", ["/tmp", "/dev/shm", "/var/tmp"])
def test_sandbox_cannot_write_shared_temp_dirs(shared):
    target = os.path.join(shared, f"alignkit-escape-{os.getpid()}")
    assert _escape_scores(f"open({target!r}, 'w').write('x')") == 0.0
    assert not os.path.exists(target)


@needs_box
def test_sandbox_cannot_write_trainer_files(tmp_path):
    target = tmp_path / "trainer_file"
    target.write_text("ok")
    target.chmod(0o666)  # even a world-writable file of ours is out of reach
    assert _escape_scores(f"open({str(target)!r}, 'w').write('overwritten')") == 0.0
    assert target.read_text() == "ok"


@needs_box
def test_sandbox_cannot_read_a_0600_file_in_a_readable_dir(tmp_path, monkeypatch):
    # Expose the directory in the box, so only the missing capabilities keep the canary unread.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    tmp_path.chmod(0o755)
    (shared / "public.txt").write_text("public")
    canary = shared / "canary.txt"
    canary.write_text("secret")
    canary.chmod(0o600)
    monkeypatch.setattr(rewards.sandbox, "_READ_ONLY", (*rewards.sandbox._READ_ONLY, str(tmp_path)))
    assert _escape_scores(f"assert open({str(shared / 'public.txt')!r}).read() == 'public'") == 1.0
    assert _escape_scores(f"print(open({str(canary)!r}).read())") == 0.0


@needs_box
@pytest.mark.parametrize("what", ["ssh", "proc_environ", "run_dir"])
def test_sandbox_cannot_read_outside_its_box(what, tmp_path):
    run_dir = tmp_path / "runs" / "demo"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("name: demo\n")
    code = {
        "ssh": f"import os\nprint(os.listdir({os.path.expanduser('~/.ssh')!r}))",
        "proc_environ": "print(open('/proc/1/environ').read())",
        "run_dir": f"print(open({str(run_dir / 'recipe.yaml')!r}).read())",
    }[what]
    assert _escape_scores(code) == 0.0


def test_code_exec_stops_rather_than_run_code_unboxed(monkeypatch):
    # Where the machine refuses the namespaces, nothing runs and training stops with the reason.
    monkeypatch.setattr(rewards.sandbox, "isolation_error", lambda python: "cannot create namespaces (EPERM)")
    with pytest.raises(rewards.sandbox.SandboxUnavailable, match="EPERM"):
        code_exec(None, [SOLUTION], tests=[TESTS])


@needs_box
def test_sandbox_drops_every_capability():
    # capget's three sets, the bounding set, ambient capabilities and no_new_privs, seen from inside.
    r = run_python(textwrap.dedent("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        header = (ctypes.c_uint32 * 2)(0x20080522, 0)
        data = (ctypes.c_uint32 * 6)()
        assert libc.capget(header, data) == 0
        bounding = [c for c in range(64) if libc.prctl(23, c, 0, 0, 0) == 1]  # PR_CAPBSET_READ
        ambient = [c for c in range(64) if libc.prctl(47, 1, c, 0, 0) == 1]   # PR_CAP_AMBIENT_IS_SET
        print(list(data), bounding, ambient, libc.prctl(39, 0, 0, 0, 0))      # PR_GET_NO_NEW_PRIVS
    """))
    assert r.ok, r.stderr
    assert r.stdout == "[0, 0, 0, 0, 0, 0] [] [] 1\n"


@pytest.fixture
def listener():
    """A loopback server in the test process: a sandbox connection would show up here."""
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.setblocking(False)
    yield srv
    srv.close()


def _no_connection(srv: socket.socket) -> bool:
    try:
        conn, _ = srv.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@needs_box
@pytest.mark.parametrize("module", ["socket", "_socket"])
@pytest.mark.parametrize("host", ["127.0.0.1", "192.0.2.1"])  # loopback; TEST-NET-1, never routed
def test_sandbox_has_no_network(listener, module, host):
    port = listener.getsockname()[1] if host == "127.0.0.1" else 80
    r = run_python(textwrap.dedent(f"""
        import {module} as s
        sock = s.socket(s.AF_INET, s.SOCK_STREAM)
        sock.settimeout(1)
        sock.connect(({host!r}, {port}))
        print("connected")
    """), timeout_s=3)
    assert not r.ok and "connected" not in r.stdout
    assert r.duration_s < 3
    assert _no_connection(listener)


def test_math_accuracy_does_not_reward_echoing_the_question():
    """math-verify alone verifies '44 + 47 =' as 91; GRPO learned to exploit that on the demo."""
    from rewards.math import math_accuracy

    completions = ["44 + 47 = ", "44 + 47 = 91", "The sum of 44 and 47 is 91.", "47"]
    assert math_accuracy(None, completions, answer=["91"] * 4) == [0.0, 1.0, 1.0, 0.0]
