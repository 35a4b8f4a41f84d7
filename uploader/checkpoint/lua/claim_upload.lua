-- Create the upload record in state "creating", unless one exists already.
-- KEYS[1] record hash, KEYS[2] index zset. ARGV[1] upload id, ARGV[2] now, ARGV[3..] field/value pairs.
-- Returns {"created"} or {"exists", state}.
local state = redis.call("HGET", KEYS[1], "state")
if state then
  return {"exists", state}
end
redis.call("HSET", KEYS[1], "state", "creating", "created", ARGV[2], "updated", ARGV[2],
  "parts_done", 0, "bytes_done", 0, "parts_sent", 0, "bytes_sent", 0, "complete_calls", 0, "generation", 1)
for i = 3, #ARGV, 2 do
  redis.call("HSET", KEYS[1], ARGV[i], ARGV[i + 1])
end
redis.call("ZADD", KEYS[2], ARGV[2], ARGV[1])
return {"created"}
