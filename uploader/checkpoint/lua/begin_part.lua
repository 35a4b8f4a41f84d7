-- A part task announces it is about to send part ARGV[1] (ARGV[2] bytes) for dispatch
-- generation ARGV[3], on behalf of worker ARGV[4] (whose heartbeat keeps the lease alive).
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases.
-- Returns {"send", mpu_id} (and counts the bytes as sent), {"recorded"} when the part is in the
-- checkpoint already, {"stale"} when a newer dispatch superseded this message (its part, if still
-- missing, was dispatched again), or {"inactive", state}.
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
redis.call("HSET", KEYS[3], ARGV[1], ARGV[4])
redis.call("HINCRBY", KEYS[1], "parts_sent", 1)
redis.call("HINCRBY", KEYS[1], "bytes_sent", ARGV[2])
return {"send", redis.call("HGET", KEYS[1], "mpu_id")}
