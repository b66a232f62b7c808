"""Reading the recipe files users write.

Two things plain `yaml.safe_load` does not do for a file a person edits:
- A key given twice in one mapping is refused. YAML loaders keep the last one silently, so a second
  `train:` section would drop every field of the first (the learning rate, say) without a word.
- Every problem reads as one line, with the line and column: PyYAML's own message spans several
  lines with a caret drawing.

(SkyPilot's own parser makes the same duplicate check on the task files in sky/.)
"""

from __future__ import annotations

from typing import Any

import yaml

MERGE_TAG = "tag:yaml.org,2002:merge"


class StrictLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[tuple[str, str], Any] = {}
            for key_node, _ in node.value:
                # `<<: *anchor` merges may be overridden by an explicit key: that is YAML's meaning.
                if not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    first = seen[key].line + 1
                    # Two `<<` keys are merged with the last winning where they share a key, the
                    # opposite of one `<<: [*a, *b]` list (the first wins): say which to write.
                    fix = "write one `<<: [*first, *second]` (earlier anchors win)" if key_node.tag == MERGE_TAG else "merge them"
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"key {key_node.value!r} is given twice in one mapping (first on line {first}); "
                        f"YAML would keep only the last, dropping the first silently: {fix}",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load(text: str) -> Any:
    """Parse YAML text like `yaml.safe_load`, refusing duplicate keys (raises yaml.YAMLError)."""
    return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader


def describe(error: yaml.YAMLError) -> str:
    """One line for a YAML error: `line L, column C: problem (context, line K)`."""
    if not isinstance(error, yaml.MarkedYAMLError) or error.problem_mark is None:
        return " ".join(str(error).split())
    mark = error.problem_mark
    text = f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    if error.context:
        at = error.context_mark
        where = f" on line {at.line + 1}" if at is not None and at.line != mark.line else ""
        text += f" ({error.context}{where})"
    return " ".join(text.split())
