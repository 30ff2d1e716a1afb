"""The projector table: each row's shapes are the module it builds, and the names the stack uses."""

from __future__ import annotations

import pytest

from factedge.convert.projectors import PROJECTORS, projector
from factedge.edge.errors import ConfigError


@pytest.mark.parametrize("name", sorted(PROJECTORS))
def test_each_row_builds_the_module_its_shapes_describe(name):
    row = PROJECTORS[name]
    module = row.build_torch(24, 40)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == row.shapes(24, 40)
    assert [type(m).__name__ for m in module] == (["Linear"] if len(row.linears) == 1 else ["Linear", "GELU", "Linear"])


def test_names_and_defaults():
    assert projector(None).name == "linear"  # LLaVA's default when a config names none
    assert (PROJECTORS["mlp2x_gelu"].gguf_type, PROJECTORS["linear"].gguf_type) == ("mlp", "linear")
    with pytest.raises(ConfigError, match="'qformer' is not supported .linear, mlp2x_gelu."):
        projector("qformer")
