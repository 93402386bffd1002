;; Does what the request header "x-probe" says:
;;   trap   - request headers: traps (unreachable)
;;   loop   - request headers: loops forever
;;   memory - request headers: grows memory until refused, then traps like a failed allocation
;;   reply  - response headers: sends a local 503 "replaced by probe\n" instead of the response
;; Every response it lets through gets "x-probe: passed".
;; A request with "x-method-override: M" goes on with ":method" M, without that header.
(module
  (import "env" "proxy_get_header_map_value" (func $get_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace_header (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove_header (param i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response"
    (func $local_response (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $ptr))

  (data (i32.const 0x1000) "x-probe")
  (data (i32.const 0x1010) "passed")
  (data (i32.const 0x1020) "replaced by probe\n")
  (data (i32.const 0x1040) "probe_reply")
  (data (i32.const 0x1050) "x-method-override")
  (data (i32.const 0x1070) ":method")

  ;; first byte of the x-probe request header, 0 when absent
  (func $probe (result i32)
    (if (call $get_header (i32.const 0) (i32.const 0x1000) (i32.const 7) (i32.const 0x10) (i32.const 0x14))
      (then (return (i32.const 0))))
    (if (i32.eqz (i32.load (i32.const 0x14))) (then (return (i32.const 0))))
    (i32.load8_u (i32.load (i32.const 0x10))))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $what i32)
    (local.set $what (call $probe))
    (if (i32.eq (local.get $what) (i32.const 116)) (then unreachable))           ;; t
    (if (i32.eq (local.get $what) (i32.const 108)) (then (loop $forever (br $forever))))  ;; l
    (if (i32.eq (local.get $what) (i32.const 109))                               ;; m
      (then
        (loop $more (br_if $more (i32.ne (memory.grow (i32.const 16)) (i32.const -1))))
        unreachable))
    (if (i32.eqz (call $get_header (i32.const 0) (i32.const 0x1050) (i32.const 17) (i32.const 0x10) (i32.const 0x14)))
      (then
        (drop (call $replace_header (i32.const 0) (i32.const 0x1070) (i32.const 7)
                (i32.load (i32.const 0x10)) (i32.load (i32.const 0x14))))
        (drop (call $remove_header (i32.const 0) (i32.const 0x1050) (i32.const 17)))))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (if (i32.eq (call $probe) (i32.const 114))                                   ;; r
      (then
        (drop (call $local_response (i32.const 503) (i32.const 0x1040) (i32.const 11)
                (i32.const 0x1020) (i32.const 18) (i32.const 0) (i32.const 0) (i32.const -1)))
        (return (i32.const 0))))
    (drop (call $add_header (i32.const 2) (i32.const 0x1000) (i32.const 7) (i32.const 0x1010) (i32.const 6)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
  (func (export "proxy_on_log") (param i32))
  (func (export "proxy_on_delete") (param i32))
)
