"""libvirt's QEMU save image, read and re-headed: how a pool VM is restored from a template.

`virDomainSave` writes a header, the domain XML, a "cookie" and then QEMU's migration
stream. Restoring a template into a *new* domain needs a new name, UUID, MAC, console,
job port and disk in that XML, but `virDomainRestoreFlags` refuses an XML whose name or
UUID differs from the saved one ("Target domain uuid ... does not match source": its ABI
check, libvirt 9). So each restored VM gets a copy of the template's save image whose
header carries its own XML (`write_with_xml`), and is restored from that copy without a
replacement XML. The copy is `copy_file_range`d (block-shared on file systems that can;
~30 ms for a 90 MB image on ext4 here) and deleted once restored.

The header is libvirt's stable on-disk format (`qemu_saveimage.h`, version 2): the magic
`LibvirtQemudSave`, then little-endian uint32 `version`, `data_len` (XML + cookie +
zero padding), `was_running`, `compressed`, `cookieOffset`, and 14 unused words. Anything
else (another magic or version, a compressed image, data that does not parse) is refused
with `SaveImageError`, never guessed at.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAGIC = b"LibvirtQemudSave"
VERSION = 2
_FIELDS = struct.Struct("<5I")  # version, data_len, was_running, compressed, cookieOffset
HEADER_BYTES = len(MAGIC) + _FIELDS.size + 14 * 4
MAX_DATA_BYTES = 16 * 1024 * 1024  # a domain XML and cookie are kilobytes


class SaveImageError(Exception):
    """Not a save image this module can re-head; the message says what it found."""


@dataclass(frozen=True)
class SaveHeader:
    data_len: int
    was_running: int
    compressed: int
    xml: str
    cookie: bytes  # kept byte for byte
    raw: bytes  # the fixed part as written (words this module does not know are kept)


def read_header(path: Path) -> SaveHeader:
    with path.open("rb") as image:
        head = image.read(HEADER_BYTES)
        if len(head) < HEADER_BYTES or not head.startswith(MAGIC):
            raise SaveImageError(f"{path}: not a libvirt QEMU save image (no {MAGIC.decode()} header)")
        version, data_len, was_running, compressed, cookie_offset = _FIELDS.unpack_from(head, len(MAGIC))
        if version != VERSION:
            raise SaveImageError(f"{path}: save image version {version}, this module knows version {VERSION}")
        if compressed:
            raise SaveImageError(f"{path}: a compressed save image cannot be re-headed (save uncompressed)")
        if not 0 < data_len <= MAX_DATA_BYTES or cookie_offset > data_len:
            raise SaveImageError(f"{path}: implausible header (data_len {data_len}, cookieOffset {cookie_offset})")
        data = image.read(data_len)
    if len(data) != data_len:
        raise SaveImageError(f"{path}: truncated header data")
    end = cookie_offset or data_len
    xml = data[:end].split(b"\0", 1)[0].decode()
    cookie = data[cookie_offset:].split(b"\0", 1)[0] if cookie_offset else b""
    return SaveHeader(data_len, was_running, compressed, xml, cookie, head)


def write_with_xml(template: Path, target: Path, xml: str) -> None:
    """`target`: a copy of the save image `template` whose header holds `xml` (the
    migration stream after it unchanged). Raises `SaveImageError` when the new XML and
    the cookie do not fit the space the template's header reserves."""
    header = read_header(template)
    xml_bytes = xml.encode() + b"\0"
    cookie_offset = len(xml_bytes) if header.cookie else 0
    data = xml_bytes + (header.cookie + b"\0" if header.cookie else b"")
    if len(data) > header.data_len:
        raise SaveImageError(
            f"{template}: the new XML needs {len(data)} bytes, the header has room for {header.data_len}"
        )
    data += b"\0" * (header.data_len - len(data))
    fields = _FIELDS.pack(VERSION, header.data_len, header.was_running, header.compressed, cookie_offset)
    fixed = MAGIC + fields + header.raw[len(MAGIC) + len(fields) :]
    tmp = target.with_name(target.name + ".partial")
    with template.open("rb") as source, open(tmp, "wb") as copy:
        size = os.fstat(source.fileno()).st_size
        copied = 0
        while copied < size:
            done = os.copy_file_range(source.fileno(), copy.fileno(), size - copied, copied, copied)
            if done == 0:
                raise SaveImageError(f"{template}: shorter than its size while copying")
            copied += done
        copy.seek(0)
        copy.write(fixed + data)
    os.replace(tmp, target)
