-- Record a part the server acknowledged, fenced by the multipart upload id it was sent to, and
-- release its in-flight lease.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases. ARGV[1] mpu id, ARGV[2] part number,
-- ARGV[3] part JSON, ARGV[4] part size, ARGV[5] now.
-- Returns "recorded", "last" (recorded, and now every part is: trigger completion),
-- "duplicate" (first record wins), "fenced" (sent to another attempt) or "inactive:<state>".
redis.call("HDEL", KEYS[3], ARGV[2])
local state = redis.call("HGET", KEYS[1], "state")
if state ~= "uploading" and state ~= "completing" then
  return "inactive:" .. (state or "missing")
end
if redis.call("HGET", KEYS[1], "mpu_id") ~= ARGV[1] then
  return "fenced"
end
if redis.call("HSETNX", KEYS[2], ARGV[2], ARGV[3]) == 0 then
  return "duplicate"
end
local done = redis.call("HINCRBY", KEYS[1], "parts_done", 1)
redis.call("HINCRBY", KEYS[1], "bytes_done", ARGV[4])
redis.call("HSET", KEYS[1], "updated", ARGV[5])
if done >= tonumber(redis.call("HGET", KEYS[1], "part_count")) then
  return "last"
end
return "recorded"
