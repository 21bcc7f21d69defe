// Health check for the HAPI FHIR container in docker-compose.yml.
//
// The hapiproject/hapi image is distroless: no shell, no curl, no wget, only java. Java
// runs a single source file directly (`java HapiReady.java URL`, Java 11 and later), so the
// check needs nothing the image lacks. HAPI accepts connections long before its database
// schema is ready, so only a 200 carrying a CapabilityStatement counts as healthy.
// Exit status: 0 ready, 1 not (the reason on stderr, which `docker inspect` shows).

import java.net.URI;
import java.net.http.HttpClient;
import java.net.http.HttpRequest;
import java.net.http.HttpResponse;
import java.time.Duration;

public class HapiReady {
    public static void main(String[] args) {
        String url = args.length > 0 ? args[0] : "http://localhost:8080/fhir/metadata";
        HttpClient client = HttpClient.newBuilder().connectTimeout(Duration.ofSeconds(5)).build();
        HttpRequest request = HttpRequest.newBuilder(URI.create(url))
                .header("Accept", "application/fhir+json")
                .timeout(Duration.ofSeconds(20))
                .build();
        try {
            HttpResponse<String> response = client.send(request, HttpResponse.BodyHandlers.ofString());
            if (response.statusCode() == 200 && response.body().contains("\"CapabilityStatement\"")) {
                System.exit(0);
            }
            System.err.println("not ready: HTTP " + response.statusCode() + " from " + url);
        } catch (Exception e) {
            System.err.println("not ready: " + e + " from " + url);
        }
        System.exit(1);
    }
}
