-- wrk script: POST /api/v1/cfssl/sign — cfssl verifies a device CSR and signs it.
-- Cycles through the request bodies in FILE: one JSON document per line,
-- {"certificate_request":"<PEM with \n escaped>"}; each thread starts at its own offset.
--   wrk -t2 -c8 -d10s -s bench/wrk/sign.lua http://127.0.0.1:PORT/api/v1/cfssl/sign -- FILE
-- Prints one WRK_SUMMARY JSON line at the end (see common.lua).
local dir = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
local common = dofile(dir .. "common.lua")

setup = common.setup
response = common.response
done = common.done

local reqs = {}
local i = 0

function init(args)
   local path = args[1]
   if not path then
      error("sign.lua: pass the request-body file after --")
   end
   local f = assert(io.open(path, "r"))
   local headers = { ["Content-Type"] = "application/json" }
   for line in f:lines() do
      if #line > 0 then
         table.insert(reqs, wrk.format("POST", nil, headers, line))
      end
   end
   f:close()
   if #reqs == 0 then
      error("sign.lua: no request bodies in " .. path)
   end
   i = ((thread_id or 0) * 97) % #reqs
end

function request()
   i = i % #reqs + 1
   return reqs[i]
end
