-- Take the one transition to "completing" (or take over a lapsed completer's lease).
-- KEYS[1] record. ARGV[1] lease token, ARGV[2] now, ARGV[3] lease seconds.
-- Returns "go" (the caller calls Complete, or sends a single-PUT upload's object, once), "missing" (parts are not all recorded),
-- "busy" (another completer holds the lease), "done" (completed) or "inactive:<state>".
local rec = KEYS[1]
local state = redis.call("HGET", rec, "state")
local now = tonumber(ARGV[2])
if state == "completed" then
  return "done"
elseif state == "completing" then
  local holder = redis.call("HGET", rec, "lease_token")
  local until_ = tonumber(redis.call("HGET", rec, "lease_until") or "0")
  if holder ~= ARGV[1] and until_ > now then
    return "busy"
  end
elseif state == "uploading" then
  local single = redis.call("HGET", rec, "mode") == "single"
  if not single and tonumber(redis.call("HGET", rec, "parts_done")) < tonumber(redis.call("HGET", rec, "part_count")) then
    return "missing"
  end
else
  return "inactive:" .. (state or "missing")
end
redis.call("HSET", rec, "state", "completing", "lease_token", ARGV[1], "lease_until", now + tonumber(ARGV[3]),
  "updated", ARGV[2])
redis.call("HINCRBY", rec, "complete_calls", 1)
if redis.call("HGET", rec, "mode") == "single" then
  -- The single PUT's caller sends the whole source next: count it here, in the same transition.
  redis.call("HINCRBY", rec, "bytes_sent", tonumber(redis.call("HGET", rec, "size") or "0"))
end
return "go"
