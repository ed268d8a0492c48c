"""pandas ``DataFrame.to_hdf`` / ``Series.to_hdf`` groups as plain arrays.

pandas' fixed format (the default) writes a frame as a group holding ``axis0`` (the column names),
``axis1`` (the index) and one ``block{i}_values`` array ``(N, columns)`` per dtype, with the group attribute
``pandas_type = "frame"``; a series as ``index`` + ``values`` with ``pandas_type = "series"``. A frame of one
dtype (one block) or a series is read as its values array; anything else (several dtypes, the ``table``
format) is refused with the arrays the group holds, so the user can pick one.
"""

from __future__ import annotations

from pathlib import Path

import h5py

from nrc_audit.errors import DatasetError


def _attr(group: h5py.Group, name: str) -> str | None:
    value = group.attrs.get(name)
    return value.decode() if isinstance(value, bytes) else (value if isinstance(value, str) else None)


def values_of(group: h5py.Group, key: str, role: str, path: Path) -> tuple[h5py.Dataset, str]:
    """The array a pandas group stands for, and a note saying what was read.

    Raises:
        DatasetError: a group that is no one-dtype pandas frame or series; the message lists its arrays.
    """
    kind = _attr(group, "pandas_type")
    blocks = sorted(n for n in group if n.startswith("block") and n.endswith("_values"))
    if kind == "frame" and len(blocks) == 1 and isinstance(group.get(blocks[0]), h5py.Dataset):
        return group[blocks[0]], f"{role} read from the pandas frame {key!r} (its {blocks[0]} array)"
    if kind == "series" and isinstance(group.get("values"), h5py.Dataset):
        return group["values"], f"{role} read from the pandas series {key!r} (its values array)"
    arrays: list[str] = []
    group.visititems(lambda name, obj: arrays.append(
        f"{key.rstrip('/')}/{name} {obj.shape} {obj.dtype}") if isinstance(obj, h5py.Dataset) else None)  # fmt: skip
    what = f"a pandas {kind} group" if kind else "an HDF5 group, not an array"
    hint = (" pandas wrote one block per dtype: save the frame with a single dtype "
            "(df.astype('float32').to_hdf(...)), or pass one block" if len(blocks) > 1 else
            " Pass the array's full path")  # fmt: skip
    raise DatasetError(
        f"{path}: {role} {key!r} is {what}; it holds the arrays {arrays or 'none'}.{hint} with "
        f"--{role.lower()}-key (e.g. {key.rstrip('/')}/{blocks[0] if blocks else 'NAME'})."
    )
