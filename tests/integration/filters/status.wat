;; Response-headers phase: replaces ":status" with its plugin configuration
;; (e.g. "418") and reports the status it replaced as "x-original-status".
;; Each root context (proxy_wasm line) keeps its own configuration:
;; 0x2000 + 8 * (root id mod 256) = (ptr, len) of the configured status;
;; 0x3000 + 4 * (context id mod 1024) = the root id of an HTTP context.
(module
  (import "env" "proxy_get_buffer_bytes" (func $get_buffer (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $ptr))

  (data (i32.const 0x1000) ":status")
  (data (i32.const 0x1010) "x-original-status")

  (func $root_slot (param $root i32) (result i32)
    (i32.add (i32.const 0x2000) (i32.shl (i32.and (local.get $root) (i32.const 0xFF)) (i32.const 3))))
  (func $ctx_slot (param $ctx i32) (result i32)
    (i32.add (i32.const 0x3000) (i32.shl (i32.and (local.get $ctx) (i32.const 0x3FF)) (i32.const 2))))

  (func (export "proxy_on_context_create") (param $ctx i32) (param $parent i32)
    (if (local.get $parent) (then (i32.store (call $ctx_slot (local.get $ctx)) (local.get $parent)))))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  ;; keep the configuration (the new status); no configuration: refuse to start
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (local $slot i32)
    (if (call $get_buffer (i32.const 7) (i32.const 0) (local.get $size) (i32.const 0x10) (i32.const 0x14))
      (then (return (i32.const 0))))
    (local.set $slot (call $root_slot (local.get $root)))
    (i32.store (local.get $slot) (i32.load (i32.const 0x10)))
    (i32.store offset=4 (local.get $slot) (i32.load (i32.const 0x14)))
    (i32.ne (i32.load (i32.const 0x14)) (i32.const 0)))
  (func (export "proxy_on_response_headers") (param $ctx i32) (param i32 i32) (result i32)
    (local $slot i32)
    (local.set $slot (call $root_slot (i32.load (call $ctx_slot (local.get $ctx)))))
    (if (i32.eqz (call $get_header (i32.const 2) (i32.const 0x1000) (i32.const 7) (i32.const 0x10) (i32.const 0x14)))
      (then (drop (call $add_header (i32.const 2) (i32.const 0x1010) (i32.const 17)
                    (i32.load (i32.const 0x10)) (i32.load (i32.const 0x14))))))
    (drop (call $replace_header (i32.const 2) (i32.const 0x1000) (i32.const 7)
            (i32.load (local.get $slot)) (i32.load offset=4 (local.get $slot))))
    (i32.const 0))
)
