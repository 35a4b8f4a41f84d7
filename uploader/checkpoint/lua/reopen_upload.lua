-- Resume: "failed", "uploading" or a lapsed "completing" -> "uploading", fenced by mpu id.
-- KEYS[1] record, KEYS[2] attention index, KEYS[3] settled uploads. ARGV[1] expected mpu id, ARGV[2] now.
-- Returns the new dispatch generation (a number), "fenced", or the state that forbids it.
local state = redis.call("HGET", KEYS[1], "state")
if state == "completing" then
  if tonumber(redis.call("HGET", KEYS[1], "lease_until") or "0") > tonumber(ARGV[2]) then
    return "completing"
  end
elseif state ~= "failed" and state ~= "uploading" then
  return state or "missing"
end
if redis.call("HGET", KEYS[1], "mpu_id") ~= ARGV[1] then
  return "fenced"
end
redis.call("HSET", KEYS[1], "state", "uploading", "error", "", "updated", ARGV[2])
redis.call("HDEL", KEYS[1], "lease_token", "lease_until", "finished")
track_attention(KEYS[1], KEYS[2], KEYS[3], ARGV[2])
return redis.call("HINCRBY", KEYS[1], "generation", 1)
