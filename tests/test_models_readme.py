"""The README's "Distilling your model" examples (CNN, ViT, LLM) run verbatim: each is the first
```python block after its <!-- example:NAME --> marker, as .ci/run reads the README's commands."""

import os
import re
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

README = Path(__file__).resolve().parent.parent / "README.md"


def example(name: str) -> str:
    text = README.read_text()
    marker = f"<!-- example:{name} -->"
    assert marker in text, f"README.md has no {marker}"
    found = re.search(r"```python\n(.*?)```", text[text.index(marker):], re.S)
    assert found is not None, f"no ```python block after {marker}"
    return found.group(1)


@pytest.mark.parametrize("name,pairs", [
    ("cnn", [("relu", "relu"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3")]),
    ("vit", [("patch_embed.proj", "patch_embed.proj"), ("blocks.0", "blocks.1"), ("blocks.1", "blocks.3")]),
    ("llm", [("transformer.h.0", "transformer.h.1"), ("transformer.h.1", "transformer.h.3")]),
])
def test_readme_example_runs_verbatim(name, pairs, capsys):
    namespace = {"__name__": f"readme_example_{name}"}
    exec(compile(example(name), f"README.md:example:{name}", "exec"), namespace)
    d, out, opt = namespace["d"], namespace["out"], namespace["opt"]
    assert d.pairs == pairs
    assert "pair 0:" in capsys.readouterr().out  # it printed the report
    assert torch.isfinite(out.loss) and out.discrepancies.shape == (len(pairs),)
    assert out.match is not None and torch.isfinite(out.discrepancies).all()
    assert int(opt.skipped_steps) == 0 and not torch.equal(opt.factors, torch.ones_like(opt.factors))
