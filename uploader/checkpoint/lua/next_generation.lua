-- Supersede generation ARGV[1]'s dispatch with a new one (parts are being dispatched again).
-- KEYS[1] record. Returns the new generation, or 0 when the upload is not "uploading" or a newer
-- generation exists already (someone else re-dispatched).
if redis.call("HGET", KEYS[1], "state") ~= "uploading" then
  return 0
end
if tonumber(redis.call("HGET", KEYS[1], "generation") or "0") ~= tonumber(ARGV[1]) then
  return 0
end
return redis.call("HINCRBY", KEYS[1], "generation", 1)
