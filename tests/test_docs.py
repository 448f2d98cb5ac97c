"""The README and benchmarks/README.md name only flags that the scripts have, and lora.py's --help shows
every flag under a topic."""
import re

import pytest
from conftest import ROOT

import convert
import fuse
import lora

# flags of other programs that the READMEs show (pip, NVIDIA's ncu, mlx.launch, the PEFT anchor's --batch and --lr,
# llama-cli's --lora)
OTHERS = {"--no-deps", "--help", "--metrics", "--profile-from-start", "--backend", "--hostfile", "--starting-port",
          "--batch", "--lr", "--lora"}


def script_flags():
    import bench
    import longest
    import wallclock

    flags = {"--size", "--repeats"}  # benchmarks/blas.py
    for parser in (lora.build_parser(), convert.build_parser(), fuse.build_parser(), bench.build_parser(),
                   wallclock.build_parser(), longest.build_parser()):
        flags |= {s for action in parser._actions for s in action.option_strings}
    # random_checkpoint.py's and data/wikisql.py's, whose parsers live in their __main__ blocks
    return flags | {"--dtype", "--max-shard-size", "--tokenizer", "--out", "--source", "--num-train", "--num-valid",
                    "--num-test", "--no-cache-frozen-layers"}


@pytest.mark.parametrize("readme", ["README.md", "benchmarks/README.md", "data/README.md"])
def test_readme_flags_exist(readme):
    text = (ROOT / readme).read_text()
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text)) - OTHERS
    assert named <= script_flags(), sorted(named - script_flags())


def test_help_groups_every_flag_by_topic():
    parser = lora.build_parser()
    topics = {group.title: [a.option_strings[0] for a in group._group_actions] for group in parser._action_groups
              if group._group_actions}
    assert topics.pop("options") == ["-h"]  # nothing left outside a topic
    assert set(topics) == {"model", "data", "LoRA", "optimisation", "checkpoints and reports", "evaluation",
                           "generation"}


def test_readme_lists_every_family_from_the_table():
    """README's "Supported models" is models.FAMILIES, row for row."""
    import models

    text = (ROOT / "README.md").read_text().split("## Supported models", 1)[1]
    rows = [r for r in re.findall(r"^\| `(\w+)` \| (.+) \|$", text, re.M) if r[0] != "model_type"]
    assert rows == [(model_type, family.models) for model_type, family in models.FAMILIES.items()]
