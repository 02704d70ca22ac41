-- wrk script: POST /api/v1/cfssl/newcert — cfssl generates a P-256 key and signs a
-- certificate for it, a different CN per request (device-<thread>NNNNNNNNN).
--   wrk -t2 -c8 -d10s -s bench/wrk/newcert.lua http://127.0.0.1:PORT/api/v1/cfssl/newcert
-- Prints one WRK_SUMMARY JSON line at the end (see common.lua).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

setup = common.setup
response = common.response
done = common.done

local n = 0
local headers = { ["Content-Type"] = "application/json" }

function init(args)
   n = (thread_id or 0) * 1000000000
end

function request()
   n = n + 1
   local body = string.format(
      '{"request":{"CN":"device-%d","key":{"algo":"ecdsa","size":256}}}', n)
   return wrk.format("POST", nil, headers, body)
end
