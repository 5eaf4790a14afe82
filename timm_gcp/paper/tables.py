"""Output of the report's tables: CSV files and markdown tables of the rows the analyses return."""
import csv
import math
from pathlib import Path
from typing import Any, List, Mapping, Sequence, Tuple

__all__ = ['write_csv', 'markdown_table', 'fmt']


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    """Write rows (dicts, keys in first-seen order) to ``path``; list values are joined with ';'."""
    keys: List[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, 'w', newline='') as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (';'.join('' if x is None else f'{x:.4g}' for x in v) if isinstance(v, list) else v)
                        for k, v in r.items()})


def fmt(x: Any) -> str:
    if x is None:
        return '—'
    if isinstance(x, bool):
        return 'yes' if x else 'NO'
    if isinstance(x, float):
        if x == 0:
            return '0'
        if math.isinf(x) or math.isnan(x):
            return str(x)
        return f'{x:.3g}' if 1e-3 <= abs(x) < 1e5 else f'{x:.2e}'
    return str(x)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Tuple[str, str]]) -> str:
    """Markdown table of ``rows``; ``columns`` are (key, header) pairs."""
    lines = ['| ' + ' | '.join(h for _, h in columns) + ' |', '|' + '---|' * len(columns)]
    for r in rows:
        lines.append('| ' + ' | '.join(fmt(r.get(k)) for k, _ in columns) + ' |')
    return '\n'.join(lines)
