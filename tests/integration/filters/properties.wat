;; Response-headers phase: reads properties with proxy_get_property and reports
;; each as a response header, so a test sees what the host answers through the
;; real gateway.  Strings are copied as they are; integers (8-byte
;; little-endian) are written in decimal from their low 32 bits; for
;; request.time only the size of the value is reported.  A property the host
;; does not know (NotFound) adds no header.  Paths are NUL-separated, as the
;; SDKs send them, except request.url_path (dotted spelling).
;; Layout: out-params at 0x10 (ptr) and 0x14 (size), digits at 0x200,
;; strings from 0x1000, heap from 0x8000 (reset for every response).
(module
  (import "env" "proxy_get_property" (func $get_property (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add_header (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 0x8000))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $size i32) (result i32)
    (local $ptr i32)
    (local.set $ptr (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $size) (i32.const 7)) (i32.const -8))))
    (local.get $ptr))

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

  ;; property $path -> response header $hdr; $kind 0 = string, 1 = integer, 2 = size
  (func $prop (param $path i32) (param $path_len i32) (param $hdr i32) (param $hdr_len i32) (param $kind i32)
    (local $ptr i32) (local $len i32)
    (if (call $get_property (local.get $path) (local.get $path_len) (i32.const 0x10) (i32.const 0x14))
      (then (return)))
    (local.set $ptr (i32.load (i32.const 0x10)))
    (local.set $len (i32.load (i32.const 0x14)))
    (if (i32.eq (local.get $kind) (i32.const 1))
      (then (local.set $len (call $itoa (i32.load (local.get $ptr)) (i32.const 0x200)))
            (local.set $ptr (i32.const 0x200))))
    (if (i32.eq (local.get $kind) (i32.const 2))
      (then (local.set $len (call $itoa (local.get $len) (i32.const 0x200)))
            (local.set $ptr (i32.const 0x200))))
    (drop (call $add_header (i32.const 2) (local.get $hdr) (local.get $hdr_len) (local.get $ptr) (local.get $len))))

  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (global.set $heap (i32.const 0x8000))
    (call $prop (i32.const 0x1000) (i32.const 12) (i32.const 0x1010) (i32.const 14) (i32.const 0))  ;; request.path
    (call $prop (i32.const 0x1020) (i32.const 16) (i32.const 0x1040) (i32.const 10) (i32.const 0))  ;; request.url_path
    (call $prop (i32.const 0x1050) (i32.const 13) (i32.const 0x1060) (i32.const 7) (i32.const 0))  ;; request.query
    (call $prop (i32.const 0x1070) (i32.const 12) (i32.const 0x1080) (i32.const 6) (i32.const 0))  ;; request.host
    (call $prop (i32.const 0x1090) (i32.const 14) (i32.const 0x10a0) (i32.const 8) (i32.const 0))  ;; request.method
    (call $prop (i32.const 0x10b0) (i32.const 14) (i32.const 0x10c0) (i32.const 8) (i32.const 0))  ;; request.scheme
    (call $prop (i32.const 0x10d0) (i32.const 16) (i32.const 0x10f0) (i32.const 10) (i32.const 0))  ;; request.protocol
    (call $prop (i32.const 0x1100) (i32.const 10) (i32.const 0x1110) (i32.const 12) (i32.const 0))  ;; request.id
    (call $prop (i32.const 0x1120) (i32.const 12) (i32.const 0x1130) (i32.const 19) (i32.const 2))  ;; request.time
    (call $prop (i32.const 0x1150) (i32.const 24) (i32.const 0x1170) (i32.const 8) (i32.const 0))  ;; request.headers.x-client
    (call $prop (i32.const 0x1180) (i32.const 14) (i32.const 0x1190) (i32.const 16) (i32.const 0))  ;; source.address
    (call $prop (i32.const 0x11b0) (i32.const 11) (i32.const 0x11c0) (i32.const 13) (i32.const 1))  ;; source.port
    (call $prop (i32.const 0x11d0) (i32.const 19) (i32.const 0x11f0) (i32.const 21) (i32.const 0))  ;; destination.address
    (call $prop (i32.const 0x1210) (i32.const 16) (i32.const 0x1230) (i32.const 18) (i32.const 1))  ;; destination.port
    (call $prop (i32.const 0x1250) (i32.const 13) (i32.const 0x1260) (i32.const 15) (i32.const 1))  ;; connection.id
    (call $prop (i32.const 0x1270) (i32.const 13) (i32.const 0x1280) (i32.const 15) (i32.const 1))  ;; response.code
    (call $prop (i32.const 0x1290) (i32.const 29) (i32.const 0x12b0) (i32.const 15) (i32.const 0))  ;; response.headers.content-type
    (call $prop (i32.const 0x12c0) (i32.const 14) (i32.const 0x12d0) (i32.const 16) (i32.const 0))  ;; plugin_root_id
    (call $prop (i32.const 0x12f0) (i32.const 11) (i32.const 0x1300) (i32.const 13) (i32.const 0))  ;; plugin_name
    (call $prop (i32.const 0x1310) (i32.const 12) (i32.const 0x1320) (i32.const 14) (i32.const 0))  ;; plugin_vm_id
    (call $prop (i32.const 0x1330) (i32.const 21) (i32.const 0x1350) (i32.const 9) (i32.const 0))  ;; request.no_such_thing
    (i32.const 0))
  (data (i32.const 0x1000) "request\00path")
  (data (i32.const 0x1010) "x-request-path")
  (data (i32.const 0x1020) "request.url_path")
  (data (i32.const 0x1040) "x-url-path")
  (data (i32.const 0x1050) "request\00query")
  (data (i32.const 0x1060) "x-query")
  (data (i32.const 0x1070) "request\00host")
  (data (i32.const 0x1080) "x-host")
  (data (i32.const 0x1090) "request\00method")
  (data (i32.const 0x10a0) "x-method")
  (data (i32.const 0x10b0) "request\00scheme")
  (data (i32.const 0x10c0) "x-scheme")
  (data (i32.const 0x10d0) "request\00protocol")
  (data (i32.const 0x10f0) "x-protocol")
  (data (i32.const 0x1100) "request\00id")
  (data (i32.const 0x1110) "x-request-id")
  (data (i32.const 0x1120) "request\00time")
  (data (i32.const 0x1130) "x-request-time-size")
  (data (i32.const 0x1150) "request\00headers\00x-client")
  (data (i32.const 0x1170) "x-client")
  (data (i32.const 0x1180) "source\00address")
  (data (i32.const 0x1190) "x-source-address")
  (data (i32.const 0x11b0) "source\00port")
  (data (i32.const 0x11c0) "x-source-port")
  (data (i32.const 0x11d0) "destination\00address")
  (data (i32.const 0x11f0) "x-destination-address")
  (data (i32.const 0x1210) "destination\00port")
  (data (i32.const 0x1230) "x-destination-port")
  (data (i32.const 0x1250) "connection\00id")
  (data (i32.const 0x1260) "x-connection-id")
  (data (i32.const 0x1270) "response\00code")
  (data (i32.const 0x1280) "x-response-code")
  (data (i32.const 0x1290) "response\00headers\00content-type")
  (data (i32.const 0x12b0) "x-response-type")
  (data (i32.const 0x12c0) "plugin_root_id")
  (data (i32.const 0x12d0) "x-plugin-root-id")
  (data (i32.const 0x12f0) "plugin_name")
  (data (i32.const 0x1300) "x-plugin-name")
  (data (i32.const 0x1310) "plugin_vm_id")
  (data (i32.const 0x1320) "x-plugin-vm-id")
  (data (i32.const 0x1330) "request\00no_such_thing")
  (data (i32.const 0x1350) "x-missing")
)
