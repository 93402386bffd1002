;; Logs every callback it gets, with the context ids, at info level:
;;   "create <ctx> <parent>", "request_headers <ctx>", "response_headers <ctx>",
;;   "done <ctx>", "log <ctx>", "delete <ctx>".
;; The error log then shows whether every HTTP context was finished.
(module
  (import "env" "proxy_log" (func $proxy_log (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "proxy_abi_version_0_2_1"))
  ;; bump allocator: the host only allocates what it returns to us (nothing here)
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $ptr))

  (data (i32.const 0x1000) "create")
  (data (i32.const 0x1010) "request_headers")
  (data (i32.const 0x1020) "response_headers")
  (data (i32.const 0x1040) "done")
  (data (i32.const 0x1050) "log")
  (data (i32.const 0x1060) "delete")

  ;; decimal digits of $n at $out; returns their count
  (func $itoa (param $n i32) (param $out i32) (result i32)
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

  ;; builds "<tag> <n>" at 0x100; returns the length
  (func $put (param $tag i32) (param $tag_len i32) (param $n i32) (result i32)
    (local $at i32)
    (memory.copy (i32.const 0x100) (local.get $tag) (local.get $tag_len))
    (local.set $at (i32.add (i32.const 0x100) (local.get $tag_len)))
    (i32.store8 (local.get $at) (i32.const 32))
    (local.set $at (i32.add (local.get $at) (i32.const 1)))
    (i32.sub (i32.add (local.get $at) (call $itoa (local.get $n) (local.get $at))) (i32.const 0x100)))

  (func $log1 (param $tag i32) (param $tag_len i32) (param $n i32)
    (drop (call $proxy_log (i32.const 2) (i32.const 0x100) (call $put (local.get $tag) (local.get $tag_len) (local.get $n)))))

  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (local $len i32) (local $at i32)
    (local.set $len (call $put (i32.const 0x1000) (i32.const 6) (local.get $ctx)))
    (local.set $at (i32.add (i32.const 0x100) (local.get $len)))
    (i32.store8 (local.get $at) (i32.const 32))
    (local.set $len (i32.add (i32.add (local.get $len) (i32.const 1))
      (call $itoa (local.get $parent) (i32.add (local.get $at) (i32.const 1)))))
    (drop (call $proxy_log (i32.const 2) (i32.const 0x100) (local.get $len))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param i32 i32) (result i32)
    (call $log1 (i32.const 0x1010) (i32.const 15) (local.get $ctx)) (i32.const 0))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (call $log1 (i32.const 0x1020) (i32.const 16) (local.get $ctx)) (i32.const 0))
  (func (export "proxy_on_done") (param $ctx i32) (result i32)
    (call $log1 (i32.const 0x1040) (i32.const 4) (local.get $ctx)) (i32.const 1))
  (func (export "proxy_on_log") (param $ctx i32)
    (call $log1 (i32.const 0x1050) (i32.const 3) (local.get $ctx)))
  (func (export "proxy_on_delete") (param $ctx i32)
    (call $log1 (i32.const 0x1060) (i32.const 6) (local.get $ctx)))
)
