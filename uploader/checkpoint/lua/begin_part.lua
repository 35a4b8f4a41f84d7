-- A part task announces it is about to send part ARGV[1] (ARGV[2] bytes) for dispatch
-- generation ARGV[3]. ARGV[4] is the lease holder "<worker>|<task id>"; the lease lives as long as
-- the worker's heartbeat key ARGV[5] .. "<worker>".
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases.
-- Returns {"send", mpu_id} (and counts the bytes as sent), {"recorded"} when the part is in the
-- checkpoint already, {"stale"} when a newer dispatch superseded this message (its part, if still
-- missing, was dispatched again), {"leased"} when another task on a live worker is sending it,
-- or {"inactive", state}.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" then
  return {"inactive", state or "missing"}
end
if tonumber(ARGV[3]) < tonumber(redis.call("HGET", KEYS[1], "generation") or "0") then
  return {"stale"}
end
if redis.call("HEXISTS", KEYS[2], ARGV[1]) == 1 then
  return {"recorded"}
end
local holder = redis.call("HGET", KEYS[3], ARGV[1])
if holder and holder ~= ARGV[4] then
  local worker = string.match(holder, "^(.*)|")
  if worker and redis.call("EXISTS", ARGV[5] .. worker) == 1 then
    return {"leased"}
  end
end
redis.call("HSET", KEYS[3], ARGV[1], ARGV[4])
redis.call("HINCRBY", KEYS[1], "parts_sent", 1)
redis.call("HINCRBY", KEYS[1], "bytes_sent", ARGV[2])
return {"send", redis.call("HGET", KEYS[1], "mpu_id")}
