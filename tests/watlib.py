"""WAT pieces the test modules share."""

# A bump allocator (params, result and body; the caller names and exports it) and
# $itoa (decimal digits of n at out, returns their count).
BUMP_ALLOCATOR = r"""(param $size i32) (result i32)
    (local $ptr i32) (local $need i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.and (i32.add (i32.add (local.get $ptr) (local.get $size)) (i32.const 7)) (i32.const -8)))
    (local.set $need (i32.sub (i32.shr_u (i32.add (global.get $heap) (i32.const 0xFFFF)) (i32.const 16)) (memory.size)))
    (if (i32.gt_s (local.get $need) (i32.const 0))
      (then (if (i32.eq (memory.grow (local.get $need)) (i32.const -1)) (then (return (i32.const 0))))))
    (local.get $ptr))
"""

ITOA = r"""  (func $itoa (param $n i32) (param $out i32) (result i32)
    (local $len i32) (local $tmp i32) (local $i i32)
    (local.set $tmp (local.get $n)) (local.set $len (i32.const 1))
    (block $done (loop $count
      (br_if $done (i32.lt_u (local.get $tmp) (i32.const 10)))
      (local.set $tmp (i32.div_u (local.get $tmp) (i32.const 10)))
      (local.set $len (i32.add (local.get $len) (i32.const 1)))
      (br $count)))
    (local.set $i (local.get $len))
    (loop $write
      (local.set $i (i32.sub (local.get $i) (i32.const 1)))
      (i32.store8 (i32.add (local.get $out) (local.get $i))
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $write (local.get $i)))
    (local.get $len))
"""


class Constants:
    """String constants a WAT module places in its memory: `s()` gives '(i32.const ptr) (i32.const len)'."""

    def __init__(self):
        self.data: list[tuple[int, bytes]] = []
        self.next = 0x1000

    def place(self, value: str | bytes) -> tuple[int, int]:
        """(address, length) of a constant placed in memory."""
        data = value.encode() if isinstance(value, str) else value
        addr = self.next
        self.data.append((addr, data))
        self.next += (len(data) + 8) & ~7
        return addr, len(data)

    def s(self, value: str | bytes) -> str:
        """'(i32.const ptr) (i32.const len)' of a constant placed in memory."""
        addr, size = self.place(value)
        return f"(i32.const {addr}) (i32.const {size})"

    def segments(self) -> list[str]:
        """The data segments that put the constants in memory."""
        return [f'  (data (i32.const {addr}) "{wat_bytes(data)}")' for addr, data in self.data]


def wat_bytes(data: bytes) -> str:
    return "".join(f"\\{b:02x}" for b in data)
