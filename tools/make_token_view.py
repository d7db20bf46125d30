"""How docs/token_view.png was made (CPU: about 45 s on a quiet 2-core machine, minutes on a busy one): teach
the tiny model the worked solutions of the tiny tokenizer's generated arithmetic problems with plain next-token
training, then run one CL-EGRSD step on them that writes the token view.

    python tools/make_token_view.py            # then open runs/token_view/tokens/step_1.html

It takes no flags, and writes runs/token_view_data.jsonl, runs/token_view_model/ and runs/token_view/.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import train_min  # noqa: E402
from trainer.offline_models import build_tiny_model, build_tiny_tokenizer, make_arithmetic_problems  # noqa: E402
from trainer.tasks import student_messages  # noqa: E402

argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(
    sys.argv[1:] if __name__ == "__main__" else [])  # (--help)
if os.path.exists("runs/token_view"):  # before the minutes of training, not after
    sys.exit("runs/token_view holds a token view made before: remove it (rm -rf runs/token_view) to make it again")
tokenizer, problems = build_tiny_tokenizer(), make_arithmetic_problems(2010, seed=0)[10:]
os.makedirs("runs", exist_ok=True)
with open("runs/token_view_data.jsonl", "w") as f:
    f.writelines(json.dumps({"problem": p.question, "solution": p.solution, "answer": p.answer}) + "\n" for p in problems)
model = build_tiny_model(tokenizer, seed=0)
optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
generator = torch.Generator().manual_seed(0)
for step in range(600):
    batch = [problems[i] for i in torch.randint(len(problems), (16,), generator=generator).tolist()]
    texts = [tokenizer.apply_chat_template(student_messages(p), tokenize=False, add_generation_prompt=True)
             + p.solution + "\nSo the answer is \\boxed{" + p.answer + "}.<|im_end|>" for p in batch]
    encoded = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    model(**encoded, labels=labels).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
model.save_pretrained("runs/token_view_model")
tokenizer.save_pretrained("runs/token_view_model")
train_min.main(["--model", "runs/token_view_model", "--device", "cpu", "--method", "cl-egrsd", "--steps", "1",
                "--batch-size", "8", "--micro-batch-size", "8", "--max-new-tokens", "160", "--eval-size", "0",
                "--data", "runs/token_view_data.jsonl", "--dump-tokens", "1", "--output-dir", "runs/token_view"])
