-- A part task announces it is about to send part ARGV[1] of ARGV[2] bytes.
-- KEYS[1] record, KEYS[2] parts. Returns {"send", mpu_id} (and counts the bytes as sent),
-- {"recorded"} when the part is already in the checkpoint, or {"inactive", state}.
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" then
  return {"inactive", state or "missing"}
end
if redis.call("HEXISTS", KEYS[2], ARGV[1]) == 1 then
  return {"recorded"}
end
redis.call("HINCRBY", KEYS[1], "parts_sent", 1)
redis.call("HINCRBY", KEYS[1], "bytes_sent", ARGV[2])
return {"send", redis.call("HGET", KEYS[1], "mpu_id")}
