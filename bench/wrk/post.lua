-- wrk script for the AzA gateway overhead benchmark (bench/run.py runs it).
--
--   wrk -t1 -cN -dS --latency -s bench/wrk/post.lua URL -- BODY_FILE [KEY] [MAX_REQUESTS]
--
-- BODY_FILE  JSON request body to POST (read once per thread).
-- KEY        bearer token ("-" or absent: no Authorization header).
-- MAX_REQUESTS  stop once this many requests were sent, across all threads
--            (0 or absent: run for the duration). Used by --long.
--
-- done() prints one line "WRK_RESULT {...}" (JSON) that run.py parses:
-- completed requests, requests *sent* (counted in request(), so requests cut
-- off when wrk stops are known), error counts, and latency percentiles in
-- microseconds.

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

local req = nil
sent = 0
local max_per_thread = 0

function init(args)
   local body_file = args[1]
   local key = args[2]
   local f = assert(io.open(body_file, "rb"))
   local body = f:read("*a")
   f:close()
   local headers = {
      ["Content-Type"] = "application/json",
      ["Accept"] = "application/json",
      ["User-Agent"] = "aza-bench/wrk",
   }
   if key ~= nil and key ~= "" and key ~= "-" then
      headers["Authorization"] = "Bearer " .. key
   end
   req = wrk.format("POST", nil, headers, body)
   local max = tonumber(args[3] or "0") or 0
   local nthreads = tonumber(args[4] or "1") or 1
   if max > 0 then
      max_per_thread = math.ceil(max / nthreads)
   end
end

function request()
   sent = sent + 1
   if max_per_thread > 0 and sent >= max_per_thread then
      wrk.thread:stop()
   end
   return req
end

function done(summary, latency, requests)
   local total_sent = 0
   for _, t in ipairs(threads) do
      total_sent = total_sent + (t:get("sent") or 0)
   end
   local e = summary.errors
   local p = function(q) return latency:percentile(q) end
   io.write(string.format(
      'WRK_RESULT {"duration_us": %d, "requests": %d, "sent": %d, "bytes": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, "p90": %d, "p99": %d, "p999": %d}}\n',
      summary.duration, summary.requests, total_sent, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.min, latency.mean, latency.max, p(50), p(90), p(99), p(99.9)))
end
