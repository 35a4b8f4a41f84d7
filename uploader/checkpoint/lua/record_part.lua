-- Record a part the server acknowledged, fenced by the multipart upload id it was sent to, and
-- release its in-flight lease.
-- KEYS[1] record, KEYS[2] parts, KEYS[3] in-flight leases. ARGV[1] mpu id, ARGV[2] part number,
-- ARGV[3] part JSON, ARGV[4] part size, ARGV[5] now.
-- Returns "recorded", "last" (recorded, and now every part is: trigger completion),
-- "duplicate" (first record wins), "fenced" (sent to another attempt), "inactive:<state>", or
-- "unplanned" (the part number is outside 1..part_count; nothing recorded).
-- The lease on the part number is released only when the part was sent to the current attempt's
-- multipart upload (whatever the state, so a part finishing under a "failed" upload does not
-- hold its number once the upload is resumed): a fenced caller is a stale task of an older
-- attempt, and the lease on that number belongs to the current task sending it.
local state = redis.call("HGET", KEYS[1], "state")
local current = state and redis.call("HGET", KEYS[1], "mpu_id") == ARGV[1]
if current then
  redis.call("HDEL", KEYS[3], ARGV[2])
end
if state ~= "uploading" and state ~= "completing" then
  return "inactive:" .. (state or "missing")
end
if not current then
  return "fenced"
end
-- begin_completion compares the *count* of recorded parts with part_count (see planned_part).
local number, part_count = planned_part(ARGV[2], KEYS[1])
if not number then
  return "unplanned"
end
if redis.call("HSETNX", KEYS[2], ARGV[2], ARGV[3]) == 0 then
  return "duplicate"
end
local done = redis.call("HINCRBY", KEYS[1], "parts_done", 1)
redis.call("HINCRBY", KEYS[1], "bytes_done", ARGV[4])
redis.call("HSET", KEYS[1], "updated", ARGV[5])
if done >= part_count then
  return "last"
end
return "recorded"
