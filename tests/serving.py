"A scripted model and a live server for the server's tests (Chapters 7 and 8)."

import torch

from llmbook.modeling import ModelConfig


class ScriptedModel(torch.nn.Module):
    "Writes `script` from position `start` on, whatever the prompt: a model whose tool calls a test can predict."

    def __init__(self, vocab_size: int, script: list[int], start: int, seq_len: int = 512):
        super().__init__()
        self.config = ModelConfig.from_depth(1, vocab_size, seq_len)
        self.lm_head = torch.nn.Linear(seq_len, vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
        self.write(script, start)

    def write(self, script: list[int], start: int):
        "Also write `script` from position `start` on (it must not overlap another script)."
        with torch.no_grad():
            assert not self.lm_head.weight[:, start - 1 : start - 1 + len(script)].any(), "scripts overlap"
            for i, token in enumerate(script):
                self.lm_head.weight[token, start - 1 + i] = 100.0  # position p predicts token p + 1

    def hidden_states(self, ids, batch):
        return torch.nn.functional.one_hot(batch.positions, self.config.seq_len).float()[None]


def wait_until_ready(url, status=200):
    import time

    import httpx

    for _ in range(500):
        if httpx.get(f"{url}/health").status_code == status:
            return
        time.sleep(0.01)
    raise TimeoutError(url)


def client_for(url, key="secret"):
    from openai import OpenAI

    return OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
