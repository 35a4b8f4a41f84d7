-- Drop recorded parts the server no longer holds (found by ListParts on resume).
-- KEYS[1] record, KEYS[2] parts. ARGV[1] mpu id, ARGV[2..] part numbers.
-- Returns the number of parts forgotten, or -1 when fenced by another attempt.
if redis.call("HGET", KEYS[1], "mpu_id") ~= ARGV[1] then
  return -1
end
local forgotten = 0
for i = 2, #ARGV do
  local value = redis.call("HGET", KEYS[2], ARGV[i])
  if value then
    local size = cjson.decode(value)["size"]
    redis.call("HDEL", KEYS[2], ARGV[i])
    redis.call("HINCRBY", KEYS[1], "parts_done", -1)
    redis.call("HINCRBY", KEYS[1], "bytes_done", -size)
    forgotten = forgotten + 1
  end
end
return forgotten
