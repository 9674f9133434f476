-- wrk script: optional rotating bearer tokens, and a JSON summary line with p50/p99/p99.9.
-- Usage: wrk -s bench/report.lua <url> -- [token-file]
local tokens = {}
local counter = 0

init = function(args)
  if args[1] then
    for line in io.lines(args[1]) do
      if #line > 0 then tokens[#tokens + 1] = line end
    end
  end
  counter = math.random(0, 1000000)
end

request = function()
  if #tokens > 0 then
    counter = counter + 1
    local token = tokens[(counter % #tokens) + 1]
    return wrk.format(nil, nil, { ["Authorization"] = "Bearer " .. token })
  end
  return wrk.format(nil, nil)
end

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "status_errors": %d, "timeouts": %d, "mean_us": %.1f, "p50_us": %d, "p90_us": %d, ' ..
    '"p99_us": %d, "p999_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max))
end
