"""The pipelines chain the stages; here `slm run assistant`, end to end on a small corpus, then served."""

import json
from itertools import islice

import pytest

from slm import pipelines
from slm.cli import main
from slm.data.stories import demo_documents


@pytest.mark.slow
def test_run_assistant_makes_a_served_assistant_and_keeps_the_model_it_started_from(tmp_path, capsys):
    openai = pytest.importorskip("openai", reason="the test asks the served assistant through the openai client")
    from slm.serve.app import create_app
    from slm.serve.in_thread import serve_in_thread

    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n<|endoftext|>\n".join(islice(demo_documents("train"), 1000)) + "\n")
    out = tmp_path / "me"
    assert main(["run", "assistant", "--source", str(corpus), "--out", str(out), "--max-minutes", "0.3",
                 "--eval-prompts", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("--- request ---") == 3 and "requests from held-out stories" in printed
    assert str(out / "pretrain") in printed
    for path in ("data/train.bin", "pretrain/best/model.safetensors", "chat.jsonl", "prompts.jsonl",
                 "best/model.safetensors", "finetune.json", "sampling.json"):
        assert (out / path).is_file(), path
    pretrain = [json.loads(line) for line in (out / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    finetune = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in pretrain) and any("loss" in r for r in finetune)
    assert f"instruct_share = {pipelines.RECIPE['instruct_share']}" in (out / "pretrain" / "config.toml").read_text()
    assert json.loads((out / "sampling.json").read_text()) == pipelines.RECIPE_SAMPLING
    # the held-out prompts' stories are the prepared validation split's, never trained on
    held = {json.loads(line)["messages"][-1]["content"] for line in (out / "prompts.jsonl").read_text().splitlines()}
    assert held and not held & {json.loads(line)["messages"][-1]["content"]
                                for line in (out / "chat.jsonl").read_text().splitlines()}

    assert main(["eval", str(out), "--data", str(corpus)]) == 0  # slm eval and slm export take the run
    assert main(["export", str(out), "--out", str(tmp_path / "hf")]) == 0
    with serve_in_thread(create_app(out, device="cpu", max_tokens=24)) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
        answer = client.chat.completions.create(model="me", messages=[
            {"role": "user", "content": "Write a story about Lily that uses the word ball."}])
        assert answer.choices[0].message.content and answer.choices[0].finish_reason in ("stop", "length")

    assert main(["run", "assistant", "--source", str(corpus), "--out", str(out), "--max-minutes", "0.3"]) == 2
    assert "--force" in capsys.readouterr().err  # an existing assistant is never replaced silently
