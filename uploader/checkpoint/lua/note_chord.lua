-- Note a Celery chord (its group id) dispatched for an upload, before its first message is sent,
-- so that its keys in the result backend can be deleted once the upload settles. An upload that
-- settled already (cancelled while its parts were being dispatched) goes to the settled
-- uploads at once.
-- KEYS[1] record, KEYS[2] attention index, KEYS[3] settled uploads. ARGV[1] group id, ARGV[2] seconds to keep the note (the
-- result backend's expiry: the chord's keys are gone by then anyway), ARGV[3] now.
local chords = KEYS[1] .. ":chords"
redis.call("SADD", chords, ARGV[1])
redis.call("EXPIRE", chords, ARGV[2])
if redis.call("ZSCORE", KEYS[2], string.match(KEYS[1], "([^:]+)$")) == false then
  track_attention(KEYS[1], KEYS[2], KEYS[3], ARGV[3])
end
return 1
