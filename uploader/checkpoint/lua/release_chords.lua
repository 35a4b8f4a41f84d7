-- The chords ARGV[2..] of upload ARGV[1] are deleted from the result backend: forget them; the
-- upload leaves the settled uploads once it has no chord on record (one noted meanwhile, by a
-- resume, stays for its own turn).
-- KEYS[1] the upload's chords ("<record key>:chords"), KEYS[2] settled uploads.
for i = 2, #ARGV do
  redis.call("SREM", KEYS[1], ARGV[i])
end
if redis.call("EXISTS", KEYS[1]) == 0 then
  redis.call("ZREM", KEYS[2], ARGV[1])
end
return 1
