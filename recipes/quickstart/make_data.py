"""Make the quick-start arithmetic data (seeded, so the committed files can be regenerated).

    python recipes/quickstart/make_data.py

Task: "What is A+B?" for A, B in 1..99; the answer is the number alone. Train and held-out pairs
never overlap. Files (each well under 1 MB):
  sft.jsonl      prompt/completion chat rows (SFT)
  pairs.jsonl    prompt, chosen (right answer), rejected (a near miss or a far-off number) (DPO, KTO, RM)
  prompts.jsonl  prompt + answer (GRPO / PPO; the answer feeds math_accuracy)
  test.jsonl     held-out prompt + answer (evals)
"""
import json
import random
from pathlib import Path

OUT = Path(__file__).parent / "data"
SIZES = {"sft": 2000, "pairs": 1000, "prompts": 500, "test": 200}


def user(text):
    return [{"role": "user", "content": text}]


def main(seed: int = 1234) -> None:
    rng = random.Random(seed)
    problems = [(a, b) for a in range(1, 100) for b in range(1, 100)]
    rng.shuffle(problems)
    test, train = problems[: SIZES["test"]], problems[SIZES["test"]:]
    OUT.mkdir(exist_ok=True)

    def write(name, rows):
        with open(OUT / f"{name}.jsonl", "w") as fh:
            for row in rows:
                fh.write(json.dumps(row) + "\n")

    q = lambda a, b: f"What is {a}+{b}?"  # noqa: E731
    write("sft", [{"prompt": user(q(a, b)), "completion": [{"role": "assistant", "content": str(a + b)}]}
                  for a, b in train[: SIZES["sft"]]])
    pairs, far = [], random.Random(seed + 1)  # its own stream: the other files stay as they were
    for i, (a, b) in enumerate(rng.sample(train, SIZES["pairs"])):
        wrong = a + b + rng.choice([-10, -2, -1, 1, 2, 10])
        while i % 2 and abs(wrong - a - b) < 15:  # every other pair far off: a 135M reward model learns
            wrong = far.randint(2, 198)             # those; on near misses alone it stayed at chance
        pairs.append({"prompt": user(q(a, b)), "chosen": [{"role": "assistant", "content": str(a + b)}],
                      "rejected": [{"role": "assistant", "content": str(wrong)}]})
    write("pairs", pairs)
    write("prompts", [{"prompt": user(q(a, b)), "answer": str(a + b)} for a, b in rng.sample(train, SIZES["prompts"])])
    write("test", [{"prompt": user(q(a, b)), "answer": str(a + b)} for a, b in test])


if __name__ == "__main__":
    main()
