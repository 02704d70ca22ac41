-- Shared by newcert.lua and sign.lua (loaded with dofile from the script's directory).
--
-- Counts answers per thread in response() — 2xx with a cfssl body saying
-- "success":true, 2xx without it, and non-2xx — and prints in done() ONE line
--   WRK_SUMMARY {"requests":…, "duration_s":…, "requests_per_second":…, "ok":…,
--                "ok_per_second":…, "non_2xx":…, "not_success":…, "socket_errors":{…},
--                "latency_ms":{"p50":…,"p90":…,"p99":…,"max":…,"mean":…}}
-- for the calling script to parse (wrk's own text report is not parsed).
local M = {}

local threads = {}
local next_id = 0

function M.setup(thread)
   thread:set("thread_id", next_id)
   next_id = next_id + 1
   table.insert(threads, thread)
end

-- Per-thread counters (each wrk thread has its own Lua state).
ok, non_2xx, not_success = 0, 0, 0

function M.response(status, headers, body)
   if status < 200 or status > 299 then
      non_2xx = non_2xx + 1
   elseif body and string.find(body, '"success":true', 1, true) then
      ok = ok + 1
   else
      not_success = not_success + 1
   end
end

function M.done(summary, latency, requests)
   local t_ok, t_non2xx, t_not_success = 0, 0, 0
   for _, thread in ipairs(threads) do
      t_ok = t_ok + (thread:get("ok") or 0)
      t_non2xx = t_non2xx + (thread:get("non_2xx") or 0)
      t_not_success = t_not_success + (thread:get("not_success") or 0)
   end
   local secs = summary.duration / 1e6
   local e = summary.errors
   local ms = function(us) return us / 1000.0 end
   io.write(string.format(
      'WRK_SUMMARY {"requests":%d,"duration_s":%.6f,"requests_per_second":%.3f,' ..
      '"ok":%d,"ok_per_second":%.3f,"non_2xx":%d,"not_success":%d,' ..
      '"wrk_status_errors":%d,"socket_errors":{"connect":%d,"read":%d,"write":%d,"timeout":%d},' ..
      '"latency_ms":{"p50":%.3f,"p90":%.3f,"p99":%.3f,"max":%.3f,"mean":%.3f}}\n',
      summary.requests, secs, summary.requests / secs,
      t_ok, t_ok / secs, t_non2xx, t_not_success,
      e.status, e.connect, e.read, e.write, e.timeout,
      ms(latency:percentile(50)), ms(latency:percentile(90)), ms(latency:percentile(99)),
      ms(latency.max), ms(latency.mean)))
end

return M
